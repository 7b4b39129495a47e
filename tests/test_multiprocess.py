"""Two processes x two devices agree: a failure on one process (a save, a damaged shard it reads, a hook) ends both
within seconds with one line and one exit code (test_training's chain test: the resume step is process 0's)."""

import glob
import os
import re
import time

import pytest

from helpers import fault_env, last_line, start_two_processes

# fsdp: each process writes and reads its own shards of the state; the model flags of test_training's chain test,
# whose compiled programs the compilation cache shares
MODEL = ("--config.ema.decay=0.5", "--config.optim.eps=1.0")
FLAGS = ("--stop_at_step=100", "--config.checkpoint_every_steps=5", "--config.parallelism=fsdp", *MODEL)


def run_two(workdir, *flags, fault=None):
  """train.py as 2 processes x 2 devices until both end: [(exit code, stderr, seconds from start to its end)]."""
  start = time.time()
  procs = start_two_processes(workdir, *flags, env_extra=fault_env(fault) if fault else None)
  ended = [None, None]
  deadline = start + 240
  while None in ended and time.time() < deadline:
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time() - start
    time.sleep(0.05)
  for p in procs:
    p.kill()
  errs = [p.communicate()[1] for p in procs]
  assert None not in ended, f"a process did not end within 240 s: {errs[0][-1500:]} | {errs[1][-1500:]}"
  return [(p.returncode, err, seconds) for p, err, seconds in zip(procs, errs, ended)]


@pytest.mark.multiprocess
def test_a_failure_on_one_process_ends_both_within_seconds_with_its_line_and_exit_code(tmp_path):
  run = tmp_path / "run"
  # 1. Process 1's save of step 10 fails (its disk is full); process 0 saves its shards and waits for process 1 in
  #    orbax's barrier. Both end with process 1's line, exit 1, and no half-written checkpoint stays.
  ends = run_two(run, *FLAGS, fault="orbax.checkpoint:CheckpointManager.save:1:1")
  lines = [last_line(err) for _, err, _ in ends]
  want = (f"train.py: error: could not write the checkpoint of step 10 to {run}/checkpoints: the disk is full; "
          "kept: 5")
  assert lines == [want, want], lines
  assert [code for code, _, _ in ends] == [1, 1]
  assert abs(ends[0][2] - ends[1][2]) < 10, ends  # the heartbeat timeout (100 s) is not waited for
  assert sorted(os.listdir(run / "checkpoints")) == ["5"]
  # 2. The data files of checkpoint 5 that only process 1 reads are damaged (emptied: cut to half, the chunks process
  #    1 reads can lie in the intact half, since the order of the background writes varies): both end with one line
  #    naming it, exit 2.
  for path in glob.glob(str(run / "checkpoints" / "5" / "params" / "ocdbt.process_1" / "d" / "*")):
    with open(path, "r+b") as f:
      f.truncate(0)
  ends = run_two(run, *FLAGS)
  lines = [last_line(err) for _, err, _ in ends]
  assert lines[0] == lines[1] and re.fullmatch(
      rf"train\.py: error: checkpoint 5 in {run}/checkpoints could not be read: .* \(on process 1\); move it aside "
      "to resume from an older one", lines[0]), lines
  assert [code for code, _, _ in ends] == [2, 2] and abs(ends[0][2] - ends[1][2]) < 10, ends
  # 3. Process 1 fails in the end-of-run sample grid (a hook) while process 0 is busy with work of its own for a
  #    minute (as with an evaluation only process 0 runs): both end with process 1's line within seconds, exit 1.
  #    (Above, process 0 also learns of the failure from its collective with the process that ended; here only the
  #    announcement reaches it.)
  sampler = "ddpm_jax.sampling:SamplerOptions.sample"
  ends = run_two(tmp_path / "hook", "--stop_at_step=2", "--config.parallelism=jit", *MODEL,
                 fault=f"{sampler}:1:0,{sampler}:0:0:sleep")
  want = "train.py: error: [Errno 5] Input/output error (injected into SamplerOptions.sample on process 1)"
  assert [last_line(err) for _, err, _ in ends] == [want, want], ends
  assert [code for code, _, _ in ends] == [1, 1] and abs(ends[0][2] - ends[1][2]) < 10, ends
