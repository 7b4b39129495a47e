"""One answer for every process of a multi-process run: process 0's decisions and any process's failure, shared
through JAX's coordination service (its key-value store; no device collective), so that
every process takes the same branch and a failure on one ends all of them within seconds."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax

PREFIX = "ddpm_jax/"
FAILURE = PREFIX + "failure"  # the first failure any process announced: {"process", "module", "name", "message"}
LEAVING = PREFIX + "leaving/"  # + process index (but 0): that process is about to end on the failure
# The longest wait for another process's answer or arrival: as long as the coordination service allows (its
# timeouts are int32 milliseconds, about 24 days), since a healthy process may be slow for any length of time (a
# long compile, a big restore); a dead process ends the run sooner, through the service's heartbeat.
WAIT_MS = 2**31 - 1
POLL_S = 0.2  # how often the failure watch looks for a failure
STOP_WAIT_S = 5.0  # how long an ending process waits for the failure watch's call in flight to return
LEAVE_WAIT_S = 10.0  # how long process 0, ending on a failure, waits for the others to be leaving (it hosts the
# key-value store: leaving earlier would take the failure with it, and the others end on a lost connection)

# Process state, like signal handlers: set by the entry point that ends processes together (watch_failures).
_report: list[Callable[[BaseException], int]] = []  # prints a failure's one line, returns its exit code
# What an ending process still does first (innermost last): fn(the failure) -> a note for its line, or None.
_cleanups: list[Callable[[BaseException], Optional[str]]] = []
_ending = threading.Lock()  # held by the thread that ends this process (the main thread or the failure watch)
_asked: dict[str, int] = {}  # decision or barrier name -> how often this process has reached it (each gets its own key)


def _client() -> Any:
  """The coordination service's client, or None in a single-process run."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  (JAX has no public key-value API)

  return distributed.global_state.client if jax.process_count() > 1 else None


def describe(error: BaseException) -> dict[str, str]:
  """An exception as JSON data another process can raise again."""
  return {"module": type(error).__module__, "name": type(error).__qualname__, "message": str(error)}


def rebuild(record: dict[str, str]) -> Exception:
  """The exception a `describe` record names (a RuntimeError with its message when that class cannot be made from
  one message)."""
  with contextlib.suppress(Exception):
    cls = getattr(importlib.import_module(record["module"]), record["name"])
    if isinstance(cls, type) and issubclass(cls, Exception):
      return cls(record["message"])
  return RuntimeError(record["message"])


def _scoped(kind: str, name: str) -> str:
  """The key of this process's next `kind` named `name`: the n-th time every process reaches it, the n-th key (so
  a decision made twice in one job gets its own answer each time)."""
  n = _asked[f"{kind}/{name}"] = _asked.get(f"{kind}/{name}", 0) + 1
  return f"{PREFIX}{kind}/{name}/{n}"


def decide(name: str, decide_fn: Callable[[], Any]) -> Any:
  """decide_fn() as process 0 computes it (a JSON value), on every process; a failure on process 0 is raised on
  every process as the same exception class and message. Every process makes the decisions of one name in the same
  order; each is a new answer."""
  client = _client()
  if client is None:
    return decide_fn()
  key = _scoped("decide", name)
  if jax.process_index() == 0:
    try:
      value = decide_fn()
    except Exception as e:
      client.key_value_set(key, json.dumps({"error": describe(e)}))
      raise
    client.key_value_set(key, json.dumps({"value": value}))
    return value
  answer = json.loads(client.blocking_key_value_get(key, WAIT_MS))
  if "error" in answer:
    raise rebuild(answer["error"])
  return answer["value"]


def wait_for_all(name: str) -> None:
  """Waits, with no deadline that a slow but healthy process can reach, until every process gets here (through the
  coordination service: no device collective, so no collective's own set-up deadline applies); nothing with one
  process."""
  client = _client()
  if client is not None:
    client.wait_at_barrier(_scoped("barrier", name), WAIT_MS)


@contextlib.contextmanager
def cleanup(fn: Callable[[BaseException], Optional[str]]) -> Iterator[None]:
  """While inside, a process ending on a shared failure first calls fn(the failure) (e.g. waiting for a checkpoint
  in flight, then removing half-written ones); what it returns, when not None, is added to the failure's line (e.g.
  what was kept)."""
  _cleanups.append(fn)
  try:
    yield
  finally:
    _cleanups.remove(fn)


NOTES = "ddpm_jax_notes"  # an error's attribute: what its one line says after its message (not __notes__, which JAX
# fills with its own remarks on errors raised through its transformations)


def add_note(error: BaseException, note: Optional[str]) -> None:
  """Adds `note` to what the error's one line says after its message, unless it is empty or said already."""
  notes = getattr(error, NOTES, [])
  if note and note not in str(error) and note not in notes:
    setattr(error, NOTES, [*notes, note])


def one_line(error: BaseException) -> str:
  """An error's message and its notes, as one line."""
  return "; ".join([str(error), *getattr(error, NOTES, [])])


def run_cleanups(failure: BaseException) -> None:
  """What a process ending at once still does first: the `cleanup` functions inside which it is, innermost first,
  given the failure, which gains their notes; one that raises is passed over: the process ends regardless."""
  for fn in reversed(list(_cleanups)):
    with contextlib.suppress(Exception):
      add_note(failure, fn(failure))


def _end(client: Any, record: dict[str, str], error: Optional[BaseException] = None, cleanups: bool = True) -> None:
  """Ends this process on a shared failure: the cleanups (each bounded in time; none when not `cleanups`), its one
  line with what they noted and its exit code (the entry point's report), then os._exit (a normal exit would wait
  for the processes stuck in a collective with the one that failed). Process 0 hosts the key-value store and leaves
  last: once every other process is leaving, or after LEAVE_WAIT_S. `error`: the record's own exception, traceback
  and all, on the process that raised it."""
  if not _ending.acquire(blocking=False):  # another thread of this process is ending it
    threading.Event().wait()
  error = error or rebuild(record)
  if cleanups:
    run_cleanups(error)
  code = _report[0](error)
  sys.stdout.flush()
  sys.stderr.flush()
  if jax.process_index():
    with contextlib.suppress(Exception):
      client.key_value_set(f"{LEAVING}{jax.process_index()}", "1")
  else:  # in a thread of its own: a call to the service can hang once another process has left
    others_leaving = threading.Thread(target=_wait_for_others_leaving, args=(client,), daemon=True)
    others_leaving.start()
    others_leaving.join(LEAVE_WAIT_S)
    time.sleep(POLL_S)  # the last one's os._exit
  os._exit(code)  # pylint: disable=protected-access


def _wait_for_others_leaving(client: Any) -> None:
  """Returns once every other process has said it is leaving."""
  while True:
    with contextlib.suppress(Exception):
      if len(client.key_value_dir_get(LEAVING)) >= jax.process_count() - 1:
        return
    time.sleep(POLL_S)


def fail_together(error: BaseException, cleanups: bool = True) -> None:
  """Once watch_failures runs, announces `error` (or the failure another process announced first) and ends this
  process as every other one will end: the same line and exit code; without this process's cleanups when not
  `cleanups` (it must write nothing more). Otherwise returns (the caller raises)."""
  client = _client()
  if client is None or not _report:
    return
  record = {"process": str(jax.process_index()), **describe(error)}
  try:
    client.key_value_set(FAILURE, json.dumps(record))
  except Exception:  # pylint: disable=broad-except  (another process announced first: end on its failure)
    with contextlib.suppress(Exception):
      record = json.loads(client.key_value_try_get(FAILURE))
  _end(client, record, error if record["process"] == str(jax.process_index()) else None, cleanups)


def watch_failures(report: Callable[[BaseException], int]) -> None:
  """With several processes, ends this process as soon as any process announces a failure (fail_together), whatever
  it is waiting for (a collective, a barrier): report(error) prints the failure's one line and returns the exit
  code. A daemon thread, stopped at exit before the interpreter finalises; call once, after
  jax.distributed.initialize."""
  client = _client()
  if client is None:
    return
  _report[:] = [report]

  stop = threading.Event()

  def watch() -> None:
    while not stop.is_set():
      try:
        record = json.loads(client.key_value_try_get(FAILURE))
      except Exception:  # pylint: disable=broad-except  (NOT_FOUND until a failure is announced)
        stop.wait(POLL_S)
        continue
      if stop.is_set():  # the process is exiting: it no longer ends on another's failure
        return
      if record["process"] != str(jax.process_index()):  # the announcing process ends itself
        _end(client, record)
      return

  thread = threading.Thread(target=watch, name="ddpm_jax-failure-watch", daemon=True)
  thread.start()
  atexit.register(_stop_watching, stop, thread)


def _stop_watching(stop: threading.Event, thread: threading.Thread) -> None:
  """Ends the failure watch before the interpreter finalises. A daemon thread that comes back from the service's
  C++ client once finalising has begun is ended inside that C++ call, and the process aborts ("FATAL: exception not
  rethrown") instead of exiting with its code."""
  stop.set()
  thread.join(STOP_WAIT_S)
