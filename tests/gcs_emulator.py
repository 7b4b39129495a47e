"""A Cloud Storage emulator for the gs:// tests: gcp-storage-emulator, in memory, in this process, on a free port.

Gaps of the emulator that `start` fills: gcsfs renames objects with
objects.moveTo, which the emulator lacks (it answers 501 and gcsfs falls back
to copy + delete after half a minute of retries): added as copy + delete; its
downloads carry no x-goog-generation header, without which tensorstore
(orbax's OCDBT arrays) reports a "Malformed StorageGeneration": added; its
multipart uploads can lose a carriage return of binary content: parsed byte
for byte; it ignores generation preconditions (ifGenerationMatch), on which the workdir
lock rests: enforced as Cloud Storage does (412 when the object's generation
differs, 0 meaning "absent"). It also counts the bytes of every request body
(`bytes_received`), lists the objects uploaded (`uploads`), and its clock can
be set apart from this machine's (`shift_clock`).
"""

import datetime
import json
import re
import socket
from http import HTTPStatus
from typing import Callable, Optional

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.settings import API_ENDPOINT

BUCKET = "bucket"  # the one bucket the emulator holds
_received = {"bytes": 0}  # request body bytes of every emulator in this process
_uploaded: list[str] = []  # the names of the objects they were sent, in order
_clock = {"offset_s": 0.0}  # the emulator's clock minus this machine's


def _move(request, response, storage, *args, **kwargs):
  """objects.moveTo within a bucket: a copy, then the source deleted when the copy succeeded."""
  request.params["dest_bucket_name"] = request.params["bucket_name"]
  objects.copy(request, response, storage)
  if response.status in (None, HTTPStatus.OK):
    storage.delete_file(request.params["bucket_name"], request.params["object_id"])


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  """objects.download, with the object's generation in an x-goog-generation header as Cloud Storage sends it."""
  _download(request, response, storage, *args, **kwargs)
  if response.status in (None, HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]


def _target(request, storage) -> tuple[str, Optional[str]]:
  """(bucket, object name) a request writes, reads or deletes: a copy's or rewrite's destination, an upload's name
  (in its query, its metadata, or its resumable session), else the object in the path."""
  params = request.params or {}
  if "dest_object_id" in params:
    return params.get("dest_bucket_name", params["bucket_name"]), params["dest_object_id"]
  if "object_id" in params:
    return params["bucket_name"], params["object_id"]
  if "upload_id" in request.query:
    return params["bucket_name"], storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
  if "name" in request.query:
    return params["bucket_name"], request.query["name"][0]
  data = request.data if isinstance(request.data, dict) else {}
  return params["bucket_name"], (data.get("meta") or data).get("name")


def _precondition_failed(request, storage) -> Optional[HTTPStatus]:
  """The status Cloud Storage answers when the request's ifGenerationMatch does not hold (412; 404 for a read or
  delete of an absent object), or None."""
  wanted = request.query.get("ifGenerationMatch")
  if not wanted:
    return None
  try:
    bucket, name = _target(request, storage)
  except NotFound:  # a finished resumable upload: the handler answers
    return None
  try:
    generation = storage.get_file_obj(bucket, name)["generation"]
  except NotFound:
    generation = None
  if wanted[0] == "0":
    return None if generation is None else HTTPStatus.PRECONDITION_FAILED
  if generation is None and request.method in ("GET", "DELETE"):
    return HTTPStatus.NOT_FOUND
  return None if generation == wanted[0] else HTTPStatus.PRECONDITION_FAILED


def _multipart(request) -> dict:
  """A multipart upload's body as the emulator's handlers take it ({"meta", "content", "content-type"}), the content
  byte for byte: the emulator's own parser (email's) can drop a carriage return from binary content."""
  boundary = b"--" + re.search(r'boundary="?([^";]+)"?', request.get_header("Content-Type")).group(1).encode()
  raw = server._decode_raw_data(server._read_raw_data(request._request_handler),  # pylint: disable=protected-access
                                request._request_handler)  # pylint: disable=protected-access
  eol = b"\r\n" if raw.startswith(boundary + b"\r\n") else b"\n"  # gcsfs ends its lines with \n alone
  (_, meta), (head, content) = (part[len(eol):-len(eol)].split(eol * 2, 1) for part in raw.split(boundary)[1:3])
  content_type = re.search(rb"content-type:\s*([^\r\n;]+)", head, re.IGNORECASE)
  return {"meta": json.loads(meta), "content": content,
          "content-type": content_type.group(1).decode() if content_type else "application/octet-stream"}


def _checked(handler: Callable) -> Callable:
  """A handler that counts the request's body bytes and first enforces its generation precondition."""

  def handle(request, response, storage, *args, **kwargs):
    _received["bytes"] += int(request.get_header("Content-Length") or 0)
    if request.method == "POST" and request.query.get("uploadType") == ["multipart"]:
      request._data = _multipart(request)  # pylint: disable=protected-access
    if request.method in ("POST", "PUT", "PATCH"):
      request.data  # pylint: disable=pointless-statement  # read the body whatever the answer
    if request.query.get("uploadType") and "upload_id" not in request.query:  # an upload starts
      _uploaded.append(_target(request, storage)[1])
    status = _precondition_failed(request, storage)
    if status is None:
      return handler(request, response, storage, *args, **kwargs)
    response.status = status
    message = "At least one of the pre-conditions you specified did not hold."
    response.json({"error": {"code": status.value, "message": message,
                             "errors": [{"domain": "global", "reason": "conditionNotMet", "message": message}]}})
    return None

  handle.checked = True
  return handle


class _ShiftedDatetime(datetime.datetime):
  """datetime whose now() is the emulator's clock: this machine's plus the offset shift_clock set."""

  @classmethod
  def now(cls, tz=None):
    return datetime.datetime.now(tz) + datetime.timedelta(seconds=_clock["offset_s"])


def _date_header(handler, timestamp=None) -> str:
  """The Date header of the emulator's answers, from its clock."""
  return _send_date(handler, (timestamp or datetime.datetime.now().timestamp()) + _clock["offset_s"])


_send_date = server.RequestHandler.date_time_string
_MOVE = (rf"^{API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
         {"POST": _move})


def free_port() -> int:
  """A TCP port nobody listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(port: int):
  """An in-memory emulator serving BUCKET on 127.0.0.1:port (stop it with .stop()), its clock this machine's."""
  if not any(getattr(f, "checked", False) for _, verbs in server.HANDLERS for f in verbs.values()):
    objects.download = _download_with_generation  # objects.get calls it for ?alt=media
    objects.datetime = _ShiftedDatetime  # the objects' timestamps
    server.RequestHandler.date_time_string = _date_header
    server.HANDLERS = tuple((regex, {verb: _checked(_download_with_generation if f is _download else f)
                                     for verb, f in verbs.items()}) for regex, verbs in (_MOVE, *server.HANDLERS))
  shift_clock(0.0)
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  emulator.start()
  return emulator


def shift_clock(seconds: float) -> None:
  """Sets the emulators' clock `seconds` ahead of this machine's (behind when negative): the times they stamp on
  objects and send in Date headers."""
  _clock["offset_s"] = float(seconds)


def bytes_received() -> int:
  """Bytes of request bodies (uploads, compose and metadata requests) the emulators in this process have received."""
  return _received["bytes"]


def uploads() -> list[str]:
  """The names of the objects uploaded to the emulators in this process, in order (one per upload)."""
  return list(_uploaded)


def environment(port: int) -> dict[str, str]:
  """What points gcsfs, google-cloud-storage and tensorstore (orbax's arrays) at the emulator, without credentials."""
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
          "FSSPEC_GCS_TOKEN": "anon",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # else gcsfs asks for bucket types the emulator lacks
