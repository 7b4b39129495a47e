"""One training run per workdir: a lock file that the kernel releases when the process holding it ends; in a bucket
(gs://), a lock object that its holder renews, taken over once it is not renewed for LEASE_S.

A bucket has no flock. There the lock object is created only if it does not
exist and renewed only while it is the holder's own (Cloud Storage generation
preconditions), every RENEW_S by a daemon thread; a run that died without
removing it (kill -9, a lost machine) leaves it stale, and the next start
takes it over once it is LEASE_S old: again with a precondition on the stale
generation, so of two starts racing for it one wins.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Union

from absl import logging

from ddpm_jax import storage

LOCK_FILE = "train.lock"  # in the workdir; empty when no run holds it (in a bucket: absent)
RENEW_S = 60.0  # a bucket lock's holder rewrites it this often
LEASE_S = 300.0  # a bucket lock not rewritten for this long belongs to a run that ended without removing it


class WorkdirBusy(ValueError):
  """Another live process holds the workdir's lock (a user error: two runs on one workdir)."""


def _describe(record: bytes) -> str:
  """'pid P on host H, running since T' from a lock's record, or what is known of it."""
  try:
    record = json.loads(record.decode("utf-8"))
    return f"pid {record['pid']} on host {record['host']}, running since {record['since']}"
  except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
    return "a process that has not yet recorded its pid and host"


def _record() -> dict:
  """This process's pid and host, and the time."""
  return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _busy(workdir: str, holder: str) -> WorkdirBusy:
  """The error of a workdir whose lock another run holds."""
  return WorkdirBusy(f"workdir {workdir!r} is in use by another run: {holder}; wait for it to end or give another "
                     "--workdir")


def acquire(workdir: str) -> Union[int, "BucketLock"]:
  """Locks the workdir for this process until release: a local one through _acquire_file, one in a bucket through
  BucketLock."""
  return BucketLock(workdir) if storage.is_remote(workdir) else _acquire_file(workdir)


def release(lock: Union[int, "BucketLock"]) -> None:
  """Gives a lock from acquire back."""
  if isinstance(lock, BucketLock):
    lock.release()
  else:
    _release_file(lock)


def _acquire_file(workdir: str) -> int:
  """Locks workdir/train.lock for this process (until release or exit) and records its pid and host there; returns
  the lock's file descriptor.

  Raises WorkdirBusy naming the holder when another live process holds it.
  A lock file left by a process that died is not held (the kernel released
  its flock with it) and is taken over; no pid check can race.
  """
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _describe(os.pread(fd, 4096, 0))
    os.close(fd)
    raise _busy(workdir, holder) from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_record()).encode("utf-8"), 0)
  return fd


def _release_file(fd: int) -> None:
  """Empties the lock file and releases the lock (closing the descriptor)."""
  os.ftruncate(fd, 0)
  os.close(fd)


class BucketLock:
  """workdir/train.lock in a bucket, held by this process: created (or taken over when stale) on construction,
  renewed every RENEW_S until release deletes it. Raises WorkdirBusy naming the holder while another run holds it."""

  def __init__(self, workdir: str):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top  # with gcsfs, for gs:// only
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top

    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    self._blob = gcs.Client().bucket(bucket).blob(f"{prefix.rstrip('/')}/{LOCK_FILE}".lstrip("/"))
    self._lost = exceptions.PreconditionFailed  # another run wrote the lock since we last read or wrote it
    try:
      self._write(0)  # only if there is no lock object
    except self._lost:
      self._take_over(workdir)
    self._stop = threading.Event()
    threading.Thread(target=self._renew, name="workdir-lock", daemon=True).start()

  def _write(self, generation: int) -> None:
    """Writes this process's record if the lock object is at `generation` (0: absent)."""
    self._blob.upload_from_string(json.dumps(_record()), content_type="application/json",
                                  if_generation_match=generation)

  def _take_over(self, workdir: str) -> None:
    """Takes over a lock object not renewed for LEASE_S; WorkdirBusy naming its holder otherwise."""
    try:
      self._blob.reload()
      holder = _describe(self._blob.download_as_bytes(if_generation_match=self._blob.generation))
    except self._lost:
      raise _busy(workdir, "a run that has just taken the lock") from None
    age = (datetime.datetime.now(datetime.timezone.utc) - self._blob.updated).total_seconds()
    if age < LEASE_S:
      raise _busy(workdir, f"{holder}, lock renewed {age:.0f} s ago (a lock not renewed for {LEASE_S:.0f} s is "
                           "taken over)")
    try:
      self._write(self._blob.generation)
    except self._lost:
      raise _busy(workdir, "a run that has just taken the lock") from None
    logging.warning("took over the lock of %s from %s: it was not renewed for %.0f s", workdir, holder, age)

  def _renew(self) -> None:
    """Rewrites the lock object every RENEW_S while it is ours; stops with a logged error once it is not."""
    while not self._stop.wait(RENEW_S):
      try:
        self._write(self._blob.generation)
      except Exception as e:  # pylint: disable=broad-except  # a failed renewal must not end the run
        logging.error("could not renew the workdir lock %s: %s", self._blob.name, e)
        if isinstance(e, self._lost):
          return

  def release(self) -> None:
    """Stops renewing and deletes the lock object if it is still ours."""
    self._stop.set()
    try:
      self._blob.delete(if_generation_match=self._blob.generation)
    except Exception as e:  # pylint: disable=broad-except  # taken over meanwhile, or storage away: nothing to undo
      logging.warning("could not remove the workdir lock %s: %s", self._blob.name, e)
