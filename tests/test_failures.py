"""Failures a user meets: damaged checkpoints, full disks, bad config files and workdirs, failed starts."""

import contextlib
import dataclasses
import errno
import glob
import json
import logging
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore

from ddpm_jax import builders, checkpoint, cli, consensus, loop, preflight, reporting, runtime, workdir_lock
from helpers import (ROOT, environment, one_error_line, python_path, run_python, run_script, run_train, small_config,
                     small_run)


def truncate_a_data_file(step_dir):
  """Cuts the largest file under a checkpoint step folder to half its size, as a crash or bad disk would."""
  files = [p for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True) if os.path.isfile(p)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
  workdir, _, create = small_run(tmp_path)
  truncate_a_data_file(os.path.join(workdir, "checkpoints", "4"))
  manager = checkpoint.make_manager(str(workdir))
  state = loop._restore_or_create(manager, create, lambda abstract: abstract)  # pylint: disable=protected-access
  manager.close()
  assert int(state.step) == 2
  err = capsys.readouterr().err
  assert f"warning: checkpoint 4 in {workdir}/checkpoints could not be read: " in err
  assert "resuming from checkpoint 2, the newest intact one; the damaged 4.damaged stay in" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4.damaged"]  # kept for inspection, out of the way
  # Step 4 damaged again: the earlier copy stays, the new one is named (and reported) beside it.
  shutil.copytree(workdir / "checkpoints" / "4.damaged", workdir / "checkpoints" / "4")
  manager = checkpoint.make_manager(str(workdir))
  state = loop._restore_or_create(manager, create, lambda abstract: abstract)  # pylint: disable=protected-access
  manager.close()
  assert int(state.step) == 2 and "the damaged 4.damaged.1 stay in" in capsys.readouterr().err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4.damaged", "4.damaged.1"]


def test_sample_names_the_intact_checkpoints_when_the_latest_is_damaged(tmp_path):
  workdir, _, _ = small_run(tmp_path)
  truncate_a_data_file(os.path.join(workdir, "checkpoints", "4", "ema_params"))
  res = run_script("sample.py", f"--workdir={workdir}", f"--out={tmp_path}/s.png", "--num_samples=2")
  assert res.returncode == 2  # a corrupt checkpoint is bad input (docs/architecture.md)
  line = one_error_line(res, "sample.py")
  assert line.startswith(f"checkpoint 4 in {workdir}/checkpoints could not be read: ")
  assert line.endswith(f"; intact: 2 (use --checkpoint {workdir}/checkpoints/2)")


def test_sample_names_the_intact_checkpoints_when_a_step_folder_lost_its_arrays(tmp_path):
  workdir, _, _ = small_run(tmp_path)
  step_dir = workdir / "checkpoints" / "4"
  for item in step_dir.iterdir():  # the items go, the step's own metadata file stays
    if item.is_dir():
      subprocess.run(["rm", "-r", str(item)], check=True)
  res = run_script("sample.py", f"--workdir={workdir}", f"--out={tmp_path}/s.png", "--num_samples=2")
  assert res.returncode == 2
  line = one_error_line(res, "sample.py")
  assert line.startswith(f"the config of checkpoint 4 in {workdir}/checkpoints could not be read: "), line
  assert line.endswith(f"; intact: 2 (use --checkpoint {workdir}/checkpoints/2)"), line


SAMPLE_DRIVER = """
import contextlib, io, json, sys
spec = json.loads(sys.argv[1])
sys.argv = ["sample.py"]
import sample
from absl import flags
from ddpm_jax import cli, preflight
real = preflight.tempfile.TemporaryFile
def unwritable(dir=None, **kwargs):
  if dir in spec["unwritable"]:
    raise OSError(13, "Permission denied")
  return real(dir=dir, **kwargs)
preflight.tempfile.TemporaryFile = unwritable
results = []
for args in spec["cases"]:
  flags.FLAGS.unparse_flags()
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      cli.flags_parser("sample.py", None)(["sample.py", *args])
      sample.main([])
      code = 0
    except SystemExit as e:
      code = e.code
  results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_sample_checks_every_flag_before_reading_or_sampling(tmp_path):
  # One process runs sample.py's main for each command line (a process each would take seconds to start).
  (tmp_path / "afile").write_text("")
  for folder in ("adir.png", "b.npz", "locked"):
    (tmp_path / folder).mkdir()
  w, out = str(tmp_path), f"--out={tmp_path}/s.png"
  cases = {
      (f"--out={w}/s.jpg",): f"--out='{w}/s.jpg' is not a .png path: the grid is written as PNG (the samples beside it "
                             "as .npz); give e.g. --out=samples.png",
      (f"--out={w}/afile/s.png",): f"--out='{w}/afile/s.png' cannot be written: '{w}/afile' is a file, not a folder: "
                                   "give a folder path",
      (f"--out={w}/adir.png",): f"--out='{w}/adir.png' cannot be written: '{w}/adir.png' is a folder; give a file path",
      (f"--out={w}/b.png",): f"--out='{w}/b.png' cannot be written: '{w}/b.npz' is a folder; give a file path",
      (f"--out={w}/locked/s.png",): f"--out='{w}/locked/s.png' cannot be written: '{w}/locked' is not writable: "
                                    "Permission denied",
      ("--scale=0", out): "--scale=0 is invalid: it must be >= 1 (or leave it out: enlarged to 64 pixels)",
      ("--batch_size=0", out): "--batch_size=0 is invalid: it must be >= 1 (or leave it out: the config's "
                               "sample.batch_size)",
      ("--batch_size=-1", out): "--batch_size=-1 is invalid: it must be >= 1 (or leave it out: the config's "
                                "sample.batch_size)",
      ("--num_samples=-5", out): "--num_samples=-5 is invalid: it must be >= 1",
      (f"--workdir={w}/locked", "--eval", out): f"workdir '{w}/locked' is not writable: Permission denied",
  }
  lines = [[f"--workdir={w}", *args] if not args[0].startswith("--workdir") else list(args) for args in cases]
  lines += [[f"--checkpoint={w}/checkpoints", out]]
  spec = json.dumps({"unwritable": [f"{w}/locked"], "cases": lines})
  res = subprocess.run([sys.executable, "-c", SAMPLE_DRIVER, spec], env=environment(), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads(res.stdout.splitlines()[-1])
  expected = list(cases.values()) + [f"--checkpoint={w}/checkpoints is a checkpoints folder, not one of its step "
                                     f"folders: give --checkpoint {w}/checkpoints/STEP, or --workdir {w} for the "
                                     "latest"]
  for args, (code, stdout, stderr), message in zip(lines, results, expected):
    assert (code, stderr) == (2, f"sample.py: error: {message}\n"), args
    assert stdout == "", args  # nothing read, nothing sampled


def test_a_failed_write_names_the_step_path_cause_and_what_was_kept(tmp_path, monkeypatch):
  workdir, config, create = small_run(tmp_path, steps=(1, 2))
  manager = checkpoint.make_manager(str(workdir))
  monkeypatch.setattr(manager, "all_steps", lambda: [2])  # a manager's list without step 1, still on disk

  def full_disk(step, args):
    os.makedirs(os.path.join(str(manager.directory), f"{step}.orbax-checkpoint-tmp-123"))
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(manager, "save", full_disk)
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.save(manager, create().replace(step=jax.numpy.asarray(4)), config.to_dict())
  assert str(info.value) == (f"could not write the checkpoint of step 4 to {workdir}/checkpoints: the disk is full; "
                             "kept: 1, 2")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # the partial folder is gone
  manager.close()


def test_a_failed_background_write_is_reported_at_the_next_save_and_at_close_naming_its_step(tmp_path, monkeypatch):
  workdir, config, create = small_run(tmp_path, steps=(2,))
  state, manager = create(), checkpoint.make_manager(str(workdir))

  def full_disk(*args, **kwargs):  # tensorstore's words; it opens each array in orbax's background writer
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")

  monkeypatch.setattr(tensorstore, "open", full_disk)
  checkpoint.save(manager, state.replace(step=jax.numpy.asarray(4)), config.to_dict())  # returns: writes go on
  with pytest.raises(checkpoint.CheckpointError) as info:  # the next save reports step 4, and does not start
    checkpoint.save(manager, state.replace(step=jax.numpy.asarray(6)), config.to_dict())
  assert str(info.value) == (f"could not write the checkpoint of step 4 to {workdir}/checkpoints: the disk is full; "
                             "kept: 2")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  checkpoint.save(manager, state.replace(step=jax.numpy.asarray(8)), config.to_dict())
  with pytest.raises(checkpoint.CheckpointError) as info:  # the end of a run reports the last save's failure
    checkpoint.close(manager)
  assert str(info.value) == (f"could not write the checkpoint of step 8 to {workdir}/checkpoints: the disk is full; "
                             "kept: 2")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_an_async_save_writes_its_steps_values_while_the_next_steps_reuse_their_buffers(tmp_path):
  training = builders.build_training(small_config(), str(tmp_path))
  runner, batches = training.runner, training.batches(0)

  def train(state, steps):
    for _ in range(steps):
      state, _ = runner.step(state, runner.put_batch(next(batches)), training.key)
    return state

  host = lambda state: jax.tree_util.tree_map(lambda x: np.array(x, copy=True), runner.get_state(state))
  state = train(runner.put_state(training.create_state()), 2)
  at_2 = host(state)
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, runner.to_save(state), training.config)
  state = train(state, 3)  # donates the saved arrays while orbax writes them
  at_5 = host(state)
  checkpoint.close(manager)
  manager = checkpoint.make_manager(str(tmp_path))
  restored = host(checkpoint.restore_state(manager, jax.eval_shape(training.create_state), 2))
  manager.close()
  same = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x, y: x.dtype == y.dtype and x.tobytes() == y.tobytes(), a, b))
  assert same(restored, at_2)
  assert not same(at_5.params, at_2.params)  # the steps after the save changed the state


def test_asyncio_reports_of_failed_orbax_tasks_are_dropped_and_other_asyncio_errors_kept():
  # A failed save raises CheckpointError; asyncio may later log the same failure of one of orbax's tasks or futures,
  # with a traceback, from its base_events module (seen on a loaded machine: 40 more lines in the full-disk test).
  quiet = runtime._OrbaxFilter()  # pylint: disable=protected-access
  record = lambda message: logging.LogRecord("asyncio", logging.ERROR, "/usr/lib/python3.11/asyncio/base_events.py",
                                             1771, message, None, None)
  for kind in ("Task", "_GatheringFuture", "Future"):
    assert not quiet.filter(record(f"{kind} exception was never retrieved\nfuture: <{kind} finished exception=...>"))
  assert quiet.filter(record("Unclosed connection"))


@contextlib.contextmanager
def small_tmpfs(path, size):
  """A tmpfs of `size` mounted at path, or a skip where mounting is not allowed."""
  os.makedirs(path, exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                    check=False).returncode:
    pytest.skip("mounting a tmpfs is not allowed here (the mocked write above covers the path)")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


@contextlib.contextmanager
def read_only(path):
  """path bind-mounted read-only onto itself, or a skip where mounting is not allowed."""
  if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, check=False).returncode:
    pytest.skip("bind mounts are not allowed here")
  try:
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, check=False).returncode:
      pytest.skip("read-only remounts are not allowed here")
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


def test_a_save_into_a_read_only_folder_ends_the_process_within_seconds(tmp_path):
  workdir, _, _ = small_run(tmp_path, steps=(2,))
  # A process saving step 4 into the read-only folder; the error propagates (exit 1, its last line).
  code = ("import pathlib, sys, tempfile, jax; from ddpm_jax import checkpoint, runtime; "
          "from helpers import small_run; runtime.quiet_orbax(); "
          "_, config, create = small_run(pathlib.Path(tempfile.mkdtemp()), steps=()); "
          "manager = checkpoint.make_manager(sys.argv[1]); "
          "checkpoint.save(manager, create().replace(step=jax.numpy.asarray(4)), config.to_dict())")
  with read_only(workdir / "checkpoints"):
    start = time.time()
    res = run_python("-c", code, workdir, env_extra={"PYTHONPATH": python_path(ROOT, ROOT / "tests")}, timeout=400)
    seconds = time.time() - start
  # Orbax's threads waiting for a step folder that was never made kept the process alive for 300 s after the error.
  assert seconds < 30, seconds
  assert res.returncode == 1
  last = res.stderr.strip().splitlines()[-1]
  assert last.endswith(f"CheckpointError: could not write the checkpoint of step 4 to {workdir}/checkpoints: no "
                       "permission to write there (or a read-only file system); kept: 2"), last
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_a_full_disk_stops_training_at_the_next_save_or_the_end_with_one_line_and_exit_1(tmp_path):
  with small_tmpfs(tmp_path / "checkpoints", "64k"):  # smaller than one checkpoint of the small model
    # The save of step 5 fails in the background: the save of step 10 reports it; the run to step 5 at its end.
    for stop, logged in ((15, [5, 10]), (5, [5])):
      res = run_train(tmp_path, f"--stop_at_step={stop}", "--config.checkpoint_every_steps=5")
      assert res.returncode == 1, res.stderr[-3000:]
      line = one_error_line(res, "train.py")
      assert line == (f"could not write the checkpoint of step 5 to {tmp_path}/checkpoints: the disk is full; "
                      "kept: no checkpoint")
      assert os.listdir(tmp_path / "checkpoints") == []  # no partial folder, as the failed run left it
      manager = checkpoint.make_manager(str(tmp_path))
      assert manager.all_steps() == [] and os.listdir(tmp_path / "checkpoints") == []
      manager.close()
      assert [json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl")] == logged  # stopped at that save
      # the end-of-run work waits for the last checkpoint: none of it is done, nor recorded as done
      assert not (tmp_path / "end_of_run.json").exists() and not (tmp_path / "curves.png").exists()


def test_a_failed_start_leaves_an_existing_run_untouched_and_makes_no_workdir(tmp_path):
  (tmp_path / "config.json").write_text('{"mine": true}')
  res = run_train(tmp_path, f"--config.dataset=folder:{tmp_path}/typo", env_extra={"JAX_LOG_COMPILES": "1"})
  assert res.returncode == 2
  assert one_error_line(res, "train.py") == f"dataset folder '{tmp_path}/typo' does not exist or is not a folder"
  assert "Compiling" not in res.stderr  # reported before the model is built: nothing compiled
  assert sorted(os.listdir(tmp_path)) == ["config.json"] and (tmp_path / "config.json").read_text() == '{"mine": true}'
  res = run_train(tmp_path / "new" / "run", f"--config.dataset=folder:{tmp_path}/typo")
  assert res.returncode == 2 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.nope=1"], "unknown config key 'nope' (--config.nope): default.py has no such key; nearest: "),
    (["--config.optim.learnin_rate=1"], "unknown config key 'optim.learnin_rate' (--config.optim.learnin_rate): "
     "default.py has no such key; nearest: optim.learning_rate, "),
    (["--config={tmp}/missing.py"], "config file '{tmp}/missing.py' does not exist"),
    (["--config={tmp}/broken.py"], "config file {tmp}/broken.py has a syntax error at line 2: "),
    (["--workdir={tmp}/afile"], "workdir '{tmp}/afile' is a file, not a folder: give a folder path"),
])
def test_config_file_and_workdir_problems_end_with_one_line_and_exit_2(tmp_path, args, message):
  (tmp_path / "broken.py").write_text("def get_config():\n  return (\n")
  (tmp_path / "afile").write_text("")
  res = run_script("train.py", f"--workdir={tmp_path}/run", *[a.format(tmp=tmp_path) for a in args])
  assert res.returncode == 2
  assert one_error_line(res, "train.py").startswith(message.format(tmp=tmp_path))


def test_a_workdir_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
  def read_only(**kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(preflight.tempfile, "TemporaryFile", read_only)
  with pytest.raises(ValueError, match=f"^workdir '{tmp_path}' is not writable: Read-only file system$"):
    preflight.check_workdir(str(tmp_path))


def test_small_ones(tmp_path):
  with pytest.raises(ValueError, match="best is not a checkpoint step folder: give WORKDIR/checkpoints/STEP"):
    checkpoint.locate(str(tmp_path / "checkpoints" / "best"))
  with pytest.raises(FloatingPointError, match="at step 7: training stopped; no checkpoint was written"):
    loop.check_finite([(7, {"loss": float("nan")})], lambda: None)
  with pytest.raises(FloatingPointError, match="the newest complete checkpoint, of step 5, predates it"):
    loop.check_finite([(7, {"loss": float("inf")})], lambda: 5)


def test_the_input_pipeline_leaves_no_autograph_files_when_killed(tmp_path):
  code = ("import os; from ddpm_jax import data; "
          "s = data.batch_stream(data.make_source('digits'), seed=0, global_batch=8, image_size=8, channels=1); "
          "next(s); os._exit(0)")  # like kill -9: no clean-up runs
  assert run_python("-c", code, env_extra={"TMPDIR": str(tmp_path)}, timeout=120).returncode == 0
  assert not list(tmp_path.glob("__autograph_generated_file*")), os.listdir(tmp_path)


def test_a_second_run_on_a_live_workdir_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
  from ddpm_jax import workdir_lock  # pylint: disable=g-import-not-at-top

  held = workdir_lock.acquire(str(tmp_path))  # this process plays the live first run
  try:
    res = run_train(tmp_path, "--stop_at_step=1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert re.fullmatch(rf"workdir '{tmp_path}' is in use by another run: pid {os.getpid()} on host "
                        rf"{re.escape(socket.gethostname())}, running since [\d-]+ [\d:]+; wait for it to end or give "
                        r"another --workdir", one_error_line(res, "train.py"))
    assert not (tmp_path / "checkpoints").exists()  # refused before the manager clears the live run's saves
  finally:
    workdir_lock.release(held)
  # A run killed with -9 leaves its record behind, but not its lock: the next run takes it over.
  code = "import sys; from ddpm_jax import workdir_lock; workdir_lock.acquire(sys.argv[1]); import os; os._exit(0)"
  assert run_python("-c", code, tmp_path).returncode == 0
  dead = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
  assert dead["pid"] != os.getpid()
  fd = workdir_lock.acquire(str(tmp_path))
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  workdir_lock.release(fd)
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""


@pytest.mark.parametrize("key, saved, value", [("model.norm_groups", 8, 4), ("diffusion.prediction", "eps", "v"),
                                               ("diffusion.schedule", "cosine", "linear")])
def test_resuming_with_a_change_that_keeps_the_shapes_is_refused_naming_the_field(tmp_path, key, saved, value):
  workdir, config, create = small_run(tmp_path, steps=(2,))  # the tiny preset's 8 norm groups (config: None)
  changed = config.to_dict()
  changed[key.split(".")[0]][key.split(".")[1]] = value
  manager = checkpoint.make_manager(str(workdir))
  with pytest.raises(ValueError) as info:
    loop._restore_or_create(manager, create, lambda a: a, changed, builders.parameter_meaning)  # pylint: disable=protected-access
  manager.close()
  assert str(info.value) == (f"checkpoint 2 in {workdir}/checkpoints was trained with {key}={saved!r} and this run "
                             f"has {key}={value!r}: its parameters mean something else under another value; resume "
                             "with the checkpoint's value or give another --workdir")
  # What does not change the parameters' meaning (compute precision, dropout, the learning rate) resumes.
  free = config.to_dict()
  free["model"]["dropout"], free["optim"]["learning_rate"] = 0.3, 1e-5
  manager = checkpoint.make_manager(str(workdir))
  assert int(loop._restore_or_create(manager, create, lambda a: a, free, builders.parameter_meaning).step) == 2  # pylint: disable=protected-access
  manager.close()


def test_no_backend_discovery_line_before_a_one_line_error(tmp_path):
  # platform=None: JAX_PLATFORMS unset, as a user runs it: JAX probes for a TPU
  res = run_script("train.py", f"--workdir={tmp_path}", "--config.optim.optimizer=sgd", platform=None)
  assert res.returncode == 2
  assert one_error_line(res, "train.py") == "optim.optimizer='sgd' is unknown: choose one of adam, adamw"
  assert "Unable to initialize backend" not in res.stderr, res.stderr  # JAX's INFO line about a missing TPU


XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes."  # XLA's words (GPU, CPU)


def test_out_of_memory_on_restore_says_so_names_the_cure_and_moves_nothing_aside(tmp_path, monkeypatch):
  workdir, _, create = small_run(tmp_path)
  manager = checkpoint.make_manager(str(workdir))

  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(XLA_OOM)

  monkeypatch.setattr(manager, "restore", out_of_memory)
  with pytest.raises(checkpoint.CheckpointOutOfMemory) as info:
    loop._restore_or_create(manager, create, lambda a: a)  # pylint: disable=protected-access
  manager.close()
  assert str(info.value) == (f"out of memory restoring checkpoint 4 in {workdir}/checkpoints onto 1 device(s) (it is "
                             "intact): shard the parameters, EMA and optimizer state over the devices with "
                             "--config.parallelism=fsdp, or lower --config.batch_size")
  assert isinstance(info.value, checkpoint.CheckpointError)  # a run-time failure: exit 1, not 2 (bad input)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # not taken for damage


def test_a_transient_read_error_is_retried_then_reported_and_moves_nothing_aside(tmp_path, monkeypatch):
  workdir, _, create = small_run(tmp_path)
  monkeypatch.setattr(checkpoint, "READ_RETRY_S", 0.0)
  manager = checkpoint.make_manager(str(workdir))
  real, calls = manager.restore, []

  def flaky(*args, **kwargs):  # times out twice, then answers
    calls.append(1)
    if len(calls) <= 2:
      raise OSError(errno.ETIMEDOUT, "Connection timed out")
    return real(*args, **kwargs)

  monkeypatch.setattr(manager, "restore", flaky)
  assert int(loop._restore_or_create(manager, create, lambda a: a).step) == 4  # pylint: disable=protected-access
  assert len(calls) == 3
  calls.clear()

  def away(*args, **kwargs):  # tensorstore's words for storage that does not answer
    calls.append(1)
    raise ValueError("UNAVAILABLE: Error reading \"ema_params/d/0\": connection reset by peer")

  monkeypatch.setattr(manager, "restore", away)
  with pytest.raises(checkpoint.CheckpointUnavailable) as info:
    loop._restore_or_create(manager, create, lambda a: a)  # pylint: disable=protected-access
  manager.close()
  assert len(calls) == checkpoint.READ_TRIES == 3
  assert str(info.value) == (f"checkpoint 4 in {workdir}/checkpoints could not be read, 3 tries: ValueError: "
                             "UNAVAILABLE: Error reading \"ema_params/d/0\": connection reset by peer; it was left as "
                             "it is: try again when the storage answers")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_disk_full_only_for_enospc_and_out_of_memory_named_so():
  cause = checkpoint._cause  # pylint: disable=protected-access
  assert cause(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
  assert cause(ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/checkpoints/5/d/0\": No space left on "
                          "device [OS error: No space left on device]")) == "the disk is full"  # tensorstore's ENOSPC
  assert cause(jax.errors.JaxRuntimeError(XLA_OOM)) == "out of memory"
  assert cause(MemoryError()) == "out of memory"
  assert cause(ValueError("RESOURCE_EXHAUSTED: quota exceeded")) == "ValueError: RESOURCE_EXHAUSTED: quota exceeded"
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top

  assert runtime.is_out_of_memory(jax.errors.JaxRuntimeError(XLA_OOM))
  assert not runtime.is_out_of_memory(OSError(errno.ENOSPC, "No space left on device"))


def test_out_of_memory_on_a_training_step_is_one_line_naming_the_cure_and_exit_1(tmp_path):
  # train.py with a training loop that runs out of device memory as XLA reports it (a real one is not cheap on CPU).
  code = ("import sys, jax; message = sys.argv.pop(); sys.argv[0] = 'train.py'; import train; from absl import app; "
          "from ddpm_jax import cli, loop\n"
          "def out_of_memory(*args): raise jax.errors.JaxRuntimeError(message)\n"
          "loop.train = out_of_memory\n"
          "app.run(train.main, flags_parser=cli.flags_parser('train.py', train.DEFAULT_CONFIG))")
  res = run_python("-c", code, f"--workdir={tmp_path}", XLA_OOM, cwd=ROOT)
  assert res.returncode == 1, res.stderr[-2000:]
  assert one_error_line(res, "train.py") == ("out of memory on the devices while training: shard the parameters, EMA "
                                             "and optimizer state over the devices with --config.parallelism=fsdp, "
                                             "or lower --config.batch_size")


def test_unusable_workdirs_are_refused_before_anything_is_built(tmp_path, monkeypatch):
  for workdir in ("", "  ", "gs://", "gs:///"):
    with pytest.raises(ValueError, match=re.escape(f"workdir {workdir!r} names no folder: give a path")):
      preflight.check_workdir(workdir)
  # A resume into a read-only checkpoints/ (the workdir itself writable) is refused before it compiles.
  (tmp_path / "checkpoints").mkdir()
  real = preflight.tempfile.TemporaryFile

  def read_only_checkpoints(dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if os.path.basename(dir) == "checkpoints":
      raise OSError(errno.EROFS, "Read-only file system")
    return real(dir=dir, **kwargs)

  monkeypatch.setattr(preflight.tempfile, "TemporaryFile", read_only_checkpoints)
  with pytest.raises(ValueError, match=re.escape(f"workdir '{tmp_path}': its checkpoints folder is not writable: "
                                                 "Read-only file system")):
    preflight.check_workdir(str(tmp_path))


def test_config_file_errors_name_the_file(tmp_path):
  (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
  (tmp_path / "bare.py").write_text("X = 1\n")
  (tmp_path / "fails.py").write_text("def get_config():\n  return 1 / 0\n")
  line = lambda name: cli.flag_error(["train.py", f"--config={tmp_path}/{name}"], RuntimeError("x"), None)
  assert line("raises.py") == f"config file '{tmp_path}/raises.py' raised RuntimeError: boom"
  assert line("bare.py") == (f"config file '{tmp_path}/bare.py' has no get_config(): a config file defines "
                             "get_config() returning an ml_collections.ConfigDict (see configs/default.py)")
  assert line("fails.py") == (f"config file '{tmp_path}/fails.py': get_config() raised ZeroDivisionError: "
                              "division by zero")


def test_help_exits_0_and_shows_the_config_flags():
  res = run_script("train.py", "-h", "--config.batch_size=7")
  assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
  assert "--workdir: Checkpoints, metrics" in res.stdout and "--config: Experiment config file" in res.stdout
  assert "  --config.batch_size=7\n" in res.stdout and "  --config.optim.learning_rate=" in res.stdout
  res = run_script("sample.py", "--help")
  assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
  assert "--out: PNG grid path" in res.stdout and "--config: Optional config" in res.stdout


def test_a_bucket_that_cannot_be_reached_is_one_line_naming_it_within_seconds(tmp_path):
  pytest.importorskip("gcsfs", reason="gcsfs is not installed (gs:// workdirs need it: requirements-gcs.txt)")
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
         "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  expected = (f"workdir 'gs://bucket/run' cannot be reached: no connection to http://127.0.0.1:{port} "
              "(ConnectionRefusedError: Connection refused); check the network")
  for script, args in (("train.py", ["--stop_at_step=1"]), ("sample.py", [f"--out={tmp_path}/s.png"])):
    start = time.time()
    res = run_script(script, "--workdir=gs://bucket/run", *args, env_extra=env)
    assert res.returncode == 2 and time.time() - start < 30, (res.returncode, res.stderr[-3000:])
    assert one_error_line(res, script) == expected  # sample.py: not "no checkpoint ... train first"


def test_a_full_disk_at_start_names_the_workdir(tmp_path):
  with small_tmpfs(tmp_path / "full", "16k"):
    (tmp_path / "full" / "fill").write_bytes(b"\0" * 16384)
    res = run_train(tmp_path / "full" / "run", "--stop_at_step=1")
  assert res.returncode == 1, res.stderr[-3000:]
  assert one_error_line(res, "train.py") == (f"the disk is full: no space left to write in the workdir "
                                             f"'{tmp_path}/full/run' ([Errno 28] No space left on device)")


def test_an_unprepared_tfds_dataset_is_one_line_naming_the_tfds_build_command(tmp_path):
  # TFDS_DATA_DIR at an empty folder, no config.data.data_dir: TFDS raised a KeyError ("splits is empty"), exit 1.
  res = run_script("train.py", f"--workdir={tmp_path}/run", "--config.dataset=tfds:cifar10",
                  env_extra={"TFDS_DATA_DIR": str(tmp_path)})
  assert res.returncode == 2, res.stderr[-3000:]
  assert one_error_line(res, "train.py") == (
      f"TFDS dataset 'cifar10' is not prepared as ArrayRecord in {tmp_path}: prepare it once with `pip install -r "
      "requirements-prepare.txt && tfds build cifar10 --file_format=array_record --data_dir=DIR` and point "
      "config.data.data_dir (or TFDS_DATA_DIR) at DIR (KeyError)")


def test_every_cleanup_runs_when_closing_the_checkpoints_fails_and_on_the_path_that_ends_by_os_exit(tmp_path,
                                                                                                   monkeypatch):
  # no train step (nothing to compile): straight to the end-of-run work
  training = dataclasses.replace(builders.build_training(small_config(), str(tmp_path), 1), end_step=0)
  writers = []
  monkeypatch.setattr(loop, "MetricWriter", lambda *a: writers.append(reporting.MetricWriter(*a)) or writers[-1])
  before = signal.getsignal(signal.SIGINT)
  seen = {}

  def end_of_run(*_):
    """Stands for a failure: first does what a process ending on another's failure does before os._exit."""
    seen["notes"] = [fn(RuntimeError()) for fn in list(consensus._cleanups)]  # pylint: disable=protected-access
    seen["writer closed"] = writers[0]._jsonl.closed  # pylint: disable=protected-access
    try:
      workdir_lock.release(workdir_lock.acquire(str(tmp_path)))  # a new open file: free only once released
      seen["lock free"] = True
    except workdir_lock.WorkdirBusy:
      seen["lock free"] = False
    raise RuntimeError("the end-of-run work failed")

  real_close = checkpoint.close

  def failing_close(manager):
    real_close(manager)
    raise checkpoint.CheckpointError("closing failed")

  monkeypatch.setattr(loop, "_finish", end_of_run)
  monkeypatch.setattr(checkpoint, "close", failing_close)
  with pytest.raises(checkpoint.CheckpointError, match="closing failed"):
    loop.train(training, str(tmp_path))
  assert seen == {"notes": ["kept: no checkpoint"], "writer closed": True, "lock free": True}
  # Closing the checkpoint manager raised, and still: the writer is closed, the handlers are back, the lock is free.
  assert writers[0]._jsonl.closed  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGINT) is before
  workdir_lock.release(workdir_lock.acquire(str(tmp_path)))
