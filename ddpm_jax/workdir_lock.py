"""One training run per workdir: a lock file that the kernel releases when the process holding it ends."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_FILE = "train.lock"  # in the workdir; empty when no run holds it


class WorkdirBusy(ValueError):
  """Another live process holds the workdir's lock (a user error: two runs on one workdir)."""


def _holder(fd: int) -> str:
  """'pid P on host H since T' from a lock file's record, or what is known of it."""
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    return f"pid {record['pid']} on host {record['host']}, running since {record['since']}"
  except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
    return "a process that has not yet recorded its pid and host"


def acquire(workdir: str) -> int:
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
    holder = _holder(fd)
    os.close(fd)
    raise WorkdirBusy(f"workdir {workdir!r} is in use by another run: {holder}; wait for it to end or give another "
                      "--workdir") from None
  record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
  return fd


def release(fd: int) -> None:
  """Empties the lock file and releases the lock (closing the descriptor)."""
  os.ftruncate(fd, 0)
  os.close(fd)
