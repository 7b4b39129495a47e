"""Checks made before any work: that a workdir or an output folder can be written, and that a bucket answers."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import urllib.parse
import uuid
from typing import Any, Callable

from etils import epath

from ddpm_jax import checkpoint, consensus, storage


def check_folder(path: str, name: str) -> None:
  """Raises ValueError starting with `name` unless `path` is a folder this process can write in, or can be made one
  (it is not made here: a start that fails later leaves nothing behind)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{name} is a file, not a folder: give a folder path")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{name} cannot be made: {existing!r} is a file")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f"{name} is not writable: {e.strerror or e}") from None


def check_workdir(workdir: str) -> None:
  """Raises ValueError unless workdir names a folder this process can write in, or can be made one, and its
  checkpoints folder, when there is one, can be written too."""
  if not workdir.strip() or (storage.is_remote(workdir) and not workdir.split("://", 1)[1].strip("/")):
    raise ValueError(f"workdir {workdir!r} names no folder: give a path (e.g. runs/default or gs://bucket/run)")
  if storage.is_remote(workdir):  # probed by process 0 alone, for every process
    consensus.decide("workdir/writable", lambda: check_remote_workdir(workdir))
    return
  check_folder(workdir, f"workdir {workdir!r}")
  if os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    check_folder(checkpoint.checkpoint_dir(workdir), f"workdir {workdir!r}: its checkpoints folder")


STORAGE_WAIT_S = 15.0  # the longest a start waits for a bucket's first answer (gcsfs retries for half a minute)
CONNECT_WAIT_S = 5.0  # the longest a start waits to open a connection to Cloud Storage


def check_reachable(path: str) -> None:
  """Raises ValueError naming a gs:// path when no connection to Cloud Storage (STORAGE_EMULATOR_HOST when set) opens
  within CONNECT_WAIT_S: at once, where the storage library would retry for half a minute. Not checked through a
  proxy (HTTPS_PROXY), which this test cannot see past."""
  if not str(path).startswith("gs://") or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy")):
    return
  url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
  parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
  try:
    socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                             timeout=CONNECT_WAIT_S).close()
  except OSError as e:
    raise ValueError(f"workdir {path!r} cannot be reached: no connection to {url} ({type(e).__name__}: "
                     f"{e.strerror or e or 'timed out'}); check the network") from None


def answer_within(seconds: float, fn: Callable[[], Any]) -> Any:
  """fn() run in a daemon thread: its result or its exception, or TimeoutError when it has not ended in `seconds`."""
  outcome: list = []

  def run() -> None:
    try:
      outcome.append((True, fn()))
    except Exception as e:  # pylint: disable=broad-except  # re-raised in the caller
      outcome.append((False, e))

  worker = threading.Thread(target=run, name="ddpm_jax-storage-probe", daemon=True)
  worker.start()
  worker.join(seconds)
  if not outcome:
    raise TimeoutError(f"no answer in {seconds:g} s")
  ok, value = outcome[0]
  if not ok:
    raise value
  return value


def _storage_cause(error: BaseException) -> str:
  """'Type: first line of the message' of a storage library's exception."""
  return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}".rstrip(": ")


def check_remote_workdir(workdir: str) -> None:
  """Raises ValueError naming workdir unless this process can write an object there (the bucket exists, the
  credentials allow it) within STORAGE_WAIT_S: writes one of its own and deletes it."""
  check_reachable(workdir)
  probe = epath.Path(storage.absolute(workdir), f".write_check.{uuid.uuid4().hex}")  # two starts probe apart

  def write() -> None:
    probe.write_text("", encoding="utf-8")
    probe.unlink()
  try:
    answer_within(STORAGE_WAIT_S, write)
  except Exception as e:  # pylint: disable=broad-except  # gcsfs, google-auth and aiohttp raise many types
    raise ValueError(f"workdir {workdir!r} cannot be written ({_storage_cause(e)}): check that the bucket exists, "
                     "that it can be reached from here and that the credentials allow writing there") from None


def check_readable(path: str) -> None:
  """Raises ValueError naming path when its storage cannot be read from here within STORAGE_WAIT_S (a bucket that
  cannot be reached or read; a missing path is no error here)."""
  if not storage.is_remote(path):
    return
  check_reachable(path)
  try:
    answer_within(STORAGE_WAIT_S, epath.Path(storage.absolute(path)).stat)
  except FileNotFoundError:
    pass
  except Exception as e:  # pylint: disable=broad-except  # gcsfs, google-auth and aiohttp raise many types
    raise ValueError(f"workdir {path!r} cannot be read ({_storage_cause(e)}): check that the bucket exists and "
                     "that the credentials allow reading it") from None
