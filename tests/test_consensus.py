"""The consensus module on its own: failures travel between processes as data; one process decides alone.
(Several processes: tests/test_multiprocess.py and test_training's chain test.)"""

import errno
import signal

import pytest

from ddpm_jax import checkpoint, consensus, loop


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
