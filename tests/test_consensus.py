"""The consensus module on its own: failures travel between processes as data; one process decides alone.
(Several processes: tests/test_multiprocess.py and test_training's chain test.)"""

import errno
import signal
import socket
import textwrap
import threading

import numpy as np
import pytest
from jax._src.lib import _jax  # JAX's coordination service, as jax.distributed starts it

from ddpm_jax import checkpoint, consensus, data, loop
from helpers import run_python


@pytest.mark.parametrize("error", [ValueError("bad value"), OSError(errno.EIO, "Input/output error"),
                                   checkpoint.CheckpointError("could not write the checkpoint of step 10")])
def test_a_failure_is_raised_again_as_its_class_with_its_line(error):
  again = consensus.rebuild(consensus.describe(error))
  assert type(again) is type(error) and str(again) == str(error)


def test_a_failure_whose_class_needs_more_than_a_message_comes_back_as_a_runtime_error_with_its_line():
  error = loop.Interrupted(5, signal.SIGTERM)  # (step, signal)
  again = consensus.rebuild(consensus.describe(error))
  assert type(again) is RuntimeError and str(again) == str(error)
  record = dict(consensus.describe(ValueError("x")), module="no_such_module")
  assert type(consensus.rebuild(record)) is RuntimeError


def test_one_process_decides_alone_and_fails_alone():
  assert consensus.decide("x", lambda: [3, 2]) == [3, 2]
  consensus.fail_together(ValueError("x"))  # returns: the caller raises, as without several processes
  with consensus.cleanup(lambda: None):
    assert len(consensus._cleanups) == 1  # pylint: disable=protected-access
  assert not consensus._cleanups  # pylint: disable=protected-access


def _free_port():
  """A TCP port nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def on_two_processes(monkeypatch, work):
  """[work(0), work(1)] run by two processes as two threads, each with its own client of one coordination service
  (JAX's, as in a real job) and its own count of decisions."""
  address = f"127.0.0.1:{_free_port()}"
  service = _jax.get_distributed_runtime_service(address, 2)
  clients = [_jax.get_distributed_runtime_client(address, i) for i in range(2)]
  me = threading.local()
  monkeypatch.setattr(consensus, "_client", lambda: clients[me.index])
  monkeypatch.setattr(consensus.jax, "process_index", lambda: me.index)
  counters = [{}, {}]

  class PerProcess:
    get = lambda self, key, default: counters[me.index].get(key, default)
    __setitem__ = lambda self, key, value: counters[me.index].__setitem__(key, value)

  monkeypatch.setattr(consensus, "_asked", PerProcess())
  answers = [None, None]

  def process(index):
    me.index = index
    clients[index].connect()
    answers[index] = work(index)
    consensus.wait_for_all("done")
    clients[index].shutdown()  # a barrier of every client

  threads = [threading.Thread(target=process, args=(i,), daemon=True) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert None not in answers, answers  # (a failed process leaves the service up: shutting it down aborts)
  service.shutdown()
  return answers


def test_each_decision_of_a_name_gets_its_own_answer_on_every_process(monkeypatch):
  # process 0 decides "resume" twice (say, two runs in one job); process 1 would decide otherwise
  answers = on_two_processes(monkeypatch, lambda index: [consensus.decide("resume", (lambda k=k: [index * 10 + k]))
                                                         for k in (1, 2)])
  assert answers == [[[1], [2]], [[1], [2]]]


def test_an_imagenet_sized_folder_listing_reaches_every_process_intact(monkeypatch):
  # 1,281,000 paths shaped as ImageNet's training files (class/class_number.JPEG, 39 MB of text; about 6.4 MB
  # packed): as builders shares process 0's listing. Process 1 lists nothing of its own.
  rng = np.random.default_rng(0)
  classes = [f"n{c:08d}" for c in rng.choice(10**8, 1000, replace=False)]
  files = sorted(f"{c}/{c}_{k}.JPEG" for c in classes for k in rng.choice(10**6, 1281, replace=False))
  answers = on_two_processes(monkeypatch, lambda index: data.unpack_listing(consensus.decide(
      "folder listing", lambda: data.pack_listing(files if index == 0 else []))))
  assert answers[0] == answers[1] == files


def test_the_failure_watch_returns_from_its_call_in_flight_before_the_process_exits():
  # A call to the coordination service that takes a while (a loaded or departed coordinator): the process ends
  # normally meanwhile. The watch must be back from the call and stopped before the interpreter finalises; a thread
  # still inside the service's C++ client then is ended there and aborts the process (exit -6).
  code = textwrap.dedent("""
      import threading, time
      from ddpm_jax import consensus

      calling = threading.Event()

      class SlowClient:
        def key_value_try_get(self, key):
          print("call", flush=True)
          calling.set()
          time.sleep(0.5)
          print("returned", flush=True)
          raise KeyError(key)  # NOT_FOUND: no failure announced

      consensus._client = SlowClient
      consensus.watch_failures(lambda error: 1)
      calling.wait(60)  # the watch is inside its first call
  """)
  out = run_python("-c", code, timeout=120)
  assert out.returncode == 0 and out.stdout.split() == ["call", "returned"], (out.stdout, out.stderr[-2000:])
