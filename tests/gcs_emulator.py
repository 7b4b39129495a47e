"""A Cloud Storage emulator for the gs:// tests: gcp-storage-emulator, in memory, in this process, on a free port.

Two gaps of the emulator are filled by `start`: gcsfs renames objects with
objects.moveTo, which the emulator lacks (it answers 501 and gcsfs falls back
to copy + delete after half a minute of retries): added as copy + delete; and
its downloads carry no x-goog-generation header, without which tensorstore
(orbax's OCDBT arrays) reports a "Malformed StorageGeneration": added.
"""

import socket
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.settings import API_ENDPOINT

BUCKET = "bucket"  # the one bucket the emulator holds


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


_MOVE = (rf"^{API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
         {"POST": _move})


def free_port() -> int:
  """A TCP port nobody listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(port: int):
  """An in-memory emulator serving BUCKET on 127.0.0.1:port (stop it with .stop())."""
  if _MOVE not in server.HANDLERS:
    objects.download = _download_with_generation  # objects.get calls it for ?alt=media
    routes = [(regex, {verb: _download_with_generation if f is _download else f for verb, f in verbs.items()})
              for regex, verbs in server.HANDLERS]
    server.HANDLERS = (_MOVE, *routes)
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  emulator.start()
  return emulator


def environment(port: int) -> dict[str, str]:
  """What points gcsfs, google-cloud-storage and tensorstore (orbax's arrays) at the emulator, without credentials."""
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
          "FSSPEC_GCS_TOKEN": "anon",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # else gcsfs asks for bucket types the emulator lacks
