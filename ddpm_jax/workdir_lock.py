"""One training run per workdir: a lock file that the kernel releases when the process holding it ends; in a bucket
(gs://), a lock object that its holder renews, taken over once it is not renewed for LEASE_S.

A bucket has no flock. There the lock object is created only if it does not
exist and renewed only while it is the holder's own (Cloud Storage generation
preconditions), every RENEW_S by a daemon thread; a run that died without
removing it (kill -9, a lost machine) leaves it stale, and the next start
takes it over once it is LEASE_S old: again with a precondition on the stale
generation, so of two starts racing for it one wins. The age is read from the
storage service's clock alone (the object's update time against the Date of
the same answer), so a host whose clock is off takes over no live lock.

A holder that loses the lock (another run wrote it) or whose renewals all fail
for STOP_S ends at once, every process of the run with one line and exit 1,
writing nothing more: it learns of it within STOP_S + RENEW_S + two requests
(2 REQUEST_TIMEOUT_S) of its last renewal, and ends within
consensus.LEAVE_WAIT_S more, well before a new start can take the lock over
(LEASE_S after that renewal on the service's clock: the renewal is stamped
there after this host sent it, and only elapsed times are compared).
"""

from __future__ import annotations

import datetime
import email.utils
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional, Union

from absl import logging

from ddpm_jax import consensus, storage

LOCK_FILE = "train.lock"  # in the workdir; empty when no run holds it (in a bucket: absent)
RENEW_S = 15.0  # a bucket lock's holder rewrites it this often
STOP_S = 90.0  # a holder none of whose renewals succeeded for this long (since it sent the last good one) ends its run
LEASE_S = 300.0  # a bucket lock not rewritten for this long belongs to a run that ended without removing it
REQUEST_TIMEOUT_S = 10.0  # the longest wait for the storage service's answer to one request of the lock
TAKE_TRIES = 3  # a start reads and tries to take the lock this many times while it changes hands


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


class LockLost(OSError):
  """This run no longer holds its workdir's bucket lock (a run-time failure: it ends at once)."""


class BucketLock:
  """workdir/train.lock in a bucket, held by this process: created (or taken over when stale) on construction,
  renewed every RENEW_S until release deletes it. Raises WorkdirBusy naming the holder while another run holds it."""

  def __init__(self, workdir: str):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top  # with gcsfs, for gs:// only
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top

    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    self._workdir, self._exceptions = workdir, exceptions
    self._client = gcs.Client()
    self._blob = self._client.bucket(bucket).blob(f"{prefix.rstrip('/')}/{LOCK_FILE}".lstrip("/"))
    self._record = json.dumps({**_record(), "token": uuid.uuid4().hex})  # the token tells this holder's writes apart
    self._generation, self._renewed = 0, time.monotonic()  # the lock's generation; when the last write was sent
    self._take()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, name="workdir-lock", daemon=True)
    self._thread.start()

  def _write(self, generation: int, **request: Any) -> None:
    """Writes this process's record if the lock object is at `generation` (0: absent), noting when it was sent;
    PreconditionFailed if not."""
    sent = time.monotonic()
    self._blob.upload_from_string(self._record, content_type="application/json", if_generation_match=generation,
                                  **request)
    self._generation, self._renewed = self._blob.generation, sent

  def _read(self) -> tuple[int, float, bytes]:
    """The lock object's generation, its age in seconds on the storage service's clock, and its record; NotFound when
    it is absent, PreconditionFailed when it changed between the two requests."""
    response = self._client._http.request(  # pylint: disable=protected-access  # its Date header: the service's clock
        "GET", self._client._connection.build_api_url(path=self._blob.path),  # pylint: disable=protected-access
        timeout=REQUEST_TIMEOUT_S)
    if response.status_code != 200:
      raise self._exceptions.from_http_response(response)
    meta = response.json()
    now = email.utils.parsedate_to_datetime(response.headers["Date"])
    age = (now - datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))).total_seconds()
    generation = int(meta["generation"])
    record = self._blob.download_as_bytes(if_generation_match=generation, timeout=REQUEST_TIMEOUT_S, retry=None)
    return generation, age, record

  def _take(self) -> None:
    """Creates the lock object, or takes over one not renewed for LEASE_S; WorkdirBusy naming its holder otherwise."""
    changed = self._exceptions.PreconditionFailed, self._exceptions.NotFound
    for _ in range(TAKE_TRIES):
      try:
        self._write(0)  # only if there is no lock object
        return
      except self._exceptions.PreconditionFailed:
        pass
      try:
        generation, age, record = self._read()
      except changed:  # removed or rewritten meanwhile: look again
        continue
      if record == self._record.encode("utf-8"):  # this start's own create, its answer lost and the request retried
        self._generation = generation
        return
      holder = _describe(record)
      if age < LEASE_S:
        raise _busy(self._workdir, f"{holder}, lock renewed {max(age, 0):.0f} s ago (a lock not renewed for "
                                   f"{LEASE_S:.0f} s is taken over)")
      try:
        self._write(generation)
      except self._exceptions.PreconditionFailed:  # another start took it, or its holder renewed it: look again
        continue
      logging.warning("took over the lock of %s from %s: it was not renewed for %.0f s", self._workdir, holder, age)
      return
    raise _busy(self._workdir, f"runs that started at the same time (the lock changed hands {TAKE_TRIES} times while "
                               "this one looked)")

  def _renew(self) -> None:
    """Rewrites the lock object every RENEW_S while it is ours; ends the run once it is not (another run wrote it),
    or once no renewal succeeded for STOP_S."""
    while not self._stop.wait(RENEW_S):
      try:
        self._write(self._generation, timeout=REQUEST_TIMEOUT_S, retry=None)
      except self._exceptions.PreconditionFailed:
        lost = self._lost()
        if lost:
          self._end(lost)
      except Exception as e:  # pylint: disable=broad-except  # storage away: retried until STOP_S
        logging.warning("could not renew the workdir lock %s: %s", self._blob.name, e)
      if time.monotonic() - self._renewed > STOP_S:
        self._end(f"no renewal of it succeeded for {STOP_S:.0f} s (the storage service did not answer or refused)")

  def _lost(self) -> Optional[str]:
    """Why the lock is no longer ours after a renewal's precondition failed, or None when it still is (a renewal
    whose answer was lost but that was written: its generation adopted) or cannot be read now."""
    try:
      generation, _, record = self._read()
    except self._exceptions.NotFound:
      return "its lock object was deleted"
    except Exception as e:  # pylint: disable=broad-except  # storage away: the renewals' deadline decides
      logging.warning("could not read the workdir lock %s: %s", self._blob.name, e)
      return None
    if record == self._record.encode("utf-8"):
      self._generation = generation
      return None
    return f"it was taken over by {_describe(record)}"

  def _end(self, reason: str) -> None:
    """Ends this run at once (every process of it), with one line and exit 1: it no longer holds the workdir and must
    write nothing more there."""
    error = LockLost(f"lost the lock of workdir {self._workdir!r}: {reason}; stopped at once without writing more, "
                     "so that a run taking the workdir over finds none of this one's writes (the checkpoints saved "
                     "before are kept)")
    consensus.fail_together(error, cleanups=False)  # with several processes: ends every one of them
    print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access

  def release(self) -> None:
    """Stops renewing (waiting for a renewal in flight) and deletes the lock object if it is still ours."""
    self._stop.set()
    self._thread.join()
    try:
      self._blob.delete(if_generation_match=self._generation, timeout=REQUEST_TIMEOUT_S)
    except Exception as e:  # pylint: disable=broad-except  # taken over meanwhile, or storage away: nothing to undo
      logging.warning("could not remove the workdir lock %s: %s", self._blob.name, e)
