"""Workdir paths on a local disk or in a bucket (`gs://bucket/run`) through etils.epath.

Local paths behave as they always did (os calls, atomic renames, appends). A
path with a scheme (`gs://`) goes through epath's fsspec backend (gcsfs):
folders are name prefixes, an object written is replaced whole when its
writer closes (so no temporary name and rename is needed for atomicity), and
appending is impossible: `appender` rewrites the whole object instead.
"""

from __future__ import annotations

import io
import os
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


class _Rewriter:
  """A text 'append' handle for storage that cannot append: keeps every line and uploads the whole object on each
  write (one upload per logged row; the object is always complete)."""

  def __init__(self, path: str, text: str):
    self._path, self._text = epath.Path(path), text

  def write(self, text: str) -> None:
    """Adds text and uploads the whole object."""
    self._text += text
    self._path.write_text(self._text, encoding="utf-8")

  def flush(self) -> None:
    """Nothing to do: every write is uploaded."""

  def close(self) -> None:
    """Nothing to do: every write is uploaded."""


def appender(path: str):
  """A text handle whose writes add to the end of a file: an append-mode file locally; remotely a _Rewriter that
  starts from the object's text and uploads it whole on every write."""
  if not is_remote(path):
    return open(path, "a", encoding="utf-8")
  p = epath.Path(path)
  return _Rewriter(path, p.read_text(encoding="utf-8") if p.exists() else "")
