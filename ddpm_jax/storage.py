"""Workdir paths on a local disk or in a bucket (`gs://bucket/run`) through etils.epath.

Local paths behave as they always did (os calls, atomic renames, appends). A
path with a scheme (`gs://`) goes through epath's fsspec backend (gcsfs):
folders are name prefixes, an object written is replaced whole when its
writer closes (so no temporary name and rename is needed for atomicity), and
an object cannot be appended to in place: `appender` uploads what is added
as a new piece and composes it onto the object's end (each byte is uploaded
once, at most every UPLOAD_EVERY_S).
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
import time
import uuid
from typing import Union

import fsspec
from etils import epath

# Listings must see what tensorstore (orbax's array writes) and other processes wrote, which gcsfs's listing cache
# would hide until this process wrote there itself. A user's own fsspec setting wins.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def is_remote(path: str) -> bool:
  """Whether a path names a location in a storage service (has a scheme such as gs://) rather than the local disk."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """A local path made absolute (os.path.abspath); a remote one without a trailing slash."""
  return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def read_lines(path: str) -> list[str]:
  """A text file's lines as open(path, errors="replace").readlines() gives them: undecodable bytes replaced,
  universal newlines."""
  text = epath.Path(path).read_bytes().decode("utf-8", errors="replace")
  return io.StringIO(text, newline=None).readlines()


def write_atomic(path: str, data: Union[str, bytes]) -> None:
  """Writes a file whole or not at all (a kill leaves the previous version): locally through a temporary file
  renamed over it; remotely one upload, which replaces the object only when complete."""
  target = epath.Path(path) if is_remote(path) else epath.Path(path + ".tmp")
  if isinstance(data, bytes):
    target.write_bytes(data)
  else:
    target.write_text(data, encoding="utf-8")
  if not is_remote(path):
    os.replace(target, path)


UPLOAD_EVERY_S = 30.0  # an appender in a bucket uploads what it was given at most this often (and when closed)


class _BucketAppender:
  """A handle whose writes (text or bytes) are added to the end of an object in a bucket: kept in memory, and
  uploaded when flushed UPLOAD_EVERY_S or more after the last upload, and when closed, as a piece (an object of its
  own beside it) composed onto the object's end, then deleted. Bytes uploaded grow linearly with what is written;
  a process killed outright loses what it had not uploaded."""

  def __init__(self, path: str):
    self._fs, self._path = fsspec.core.url_to_fs(path)
    self._exists = self._fs.exists(self._path)
    self._pending, self._uploaded = bytearray(), -UPLOAD_EVERY_S  # the first flush uploads
    self._lock = threading.Lock()  # tensorboardX writes from its own thread

  def write(self, data: Union[str, bytes]) -> int:
    """Adds text (as UTF-8) or bytes; returns their length."""
    with self._lock:
      self._pending += data.encode("utf-8") if isinstance(data, str) else data
    return len(data)

  def flush(self) -> None:
    """Uploads what was added once UPLOAD_EVERY_S have passed since the last upload."""
    if time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
      self._upload()

  def close(self) -> None:
    """Uploads what was added."""
    self._upload()

  def _upload(self) -> None:
    """Appends what was added to the object (creates it the first time)."""
    with self._lock:
      data, self._pending = bytes(self._pending), bytearray()
      self._uploaded = time.monotonic()
      if not data:
        return
      if not self._exists:
        self._fs.pipe_file(self._path, data)
        self._exists = True
        return
      piece = posixpath.join(posixpath.dirname(self._path), f".append-{uuid.uuid4().hex}")  # no tfevents in its name
      self._fs.pipe_file(piece, data)
      try:
        self._fs.merge(self._path, [self._path, piece])
      finally:
        self._fs.rm_file(piece)


def appender(path: str):
  """A handle whose writes add to the end of a file: an append-mode text file locally; in a bucket a
  _BucketAppender (text or bytes), which uploads at most every UPLOAD_EVERY_S and when closed."""
  if not is_remote(path):
    return open(path, "a", encoding="utf-8")
  return _BucketAppender(path)
