"""Training: device-count invariance, learning, exact resume, preemption, NaN guard, config errors, multi-host."""

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpoint, loop, run_record
from helpers import (ROOT, SMALL_MODEL, assert_row_describes_this_machine, fault_env, new_state, run_python,
                     run_script, run_train, small_config, start_two_processes)


def restore_host_state(workdir, config, step=None):
  template = jax.eval_shape(lambda: new_state(config))
  manager = checkpoint.make_manager(str(workdir), create=False)
  state = checkpoint.restore_state(manager, template, step)
  manager.close()
  return jax.device_get(state)


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_a_restored_state_compiles_the_train_step_once():
  # A restored state mixes arrays committed to the device (orbax's) with a step made afresh (uncommitted); placed as
  # it was, the step's committed output compiled the train step again at the second step (a minute for the small
  # model on a loaded machine, counted in the first progress line's rate: "ETA 1:25:20" for a run of seconds).
  from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 1  # the plain-jit runner
  step_fn = lambda state, batch, key, axis_name=None: ({"step": state["step"] + 1, "w": state["w"] * batch},
                                                       {"loss": state["w"].sum()})
  runner = parallel.make_runner(step_fn)
  placed = runner.put_state({"step": jax.numpy.asarray(3), "w": jax.device_put(np.ones(2), jax.devices()[0])})
  for _ in range(3):
    placed, _ = runner.step(placed, np.full(2, 0.5, np.float32), jax.random.key(0))
  assert runner.step._cache_size() == 1 and int(placed["step"]) == 6  # pylint: disable=protected-access


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, imported_tensorflow):
  first = run_train(tmp_path / "resumed", "--stop_at_step=6")
  assert first.returncode == 0, first.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["6"]
  second = run_train(tmp_path / "resumed", "--stop_at_step=12")
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resumed from the checkpoint of step 6" in second.stderr
  # Each start added its row to the run record.
  rows = run_record.read(str(tmp_path / "resumed"))
  assert len(rows) == 2 and rows[0]["run_id"] != rows[1]["run_id"]
  assert_row_describes_this_machine(rows[0], command_has="--stop_at_step=6", resumed_from=None)
  assert_row_describes_this_machine(rows[1], command_has="--stop_at_step=12", resumed_from=6)
  # The straight run also evaluates at its last step: sampling must not disturb the training state.
  straight = run_train(tmp_path / "straight", "--stop_at_step=12", "--config.eval_every_steps=12",
                       "--config.eval_num_samples=32", "--config.sample.num_steps=4", "--config.sample.every_steps=12",
                       "--config.sample.num_samples=6", python_flags=("-X", "importtime"))
  assert straight.returncode == 0, straight.stderr[-2000:]
  # No TensorFlow in the training process: -X importtime lists every module imported.
  assert imported_tensorflow(straight.stderr) == []
  assert re.search(r"eval at step 12: 32 samples: [\d.]+% classified with confidence >= 0.9", straight.stdout)
  last = json.loads(open(tmp_path / "straight" / "metrics.jsonl").read().splitlines()[-1])
  assert last["step"] == 12 and 0 <= last["eval/confident_fraction"] <= 1 and last["eval/frechet_distance"] > 0
  config = small_config()
  a = restore_host_state(tmp_path / "straight", config, 12)
  b = restore_host_state(tmp_path / "resumed", config, 12)
  assert int(a.step) == int(b.step) == 12
  assert_trees_equal((a.params, a.ema_params, a.opt_state), (b.params, b.ema_params, b.opt_state))
  # The metrics log continues where it stopped.
  steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert steps == [5, 6, 10, 12]
  # The sample grid of step 12: 6 samples in 3 columns, 8x8 enlarged to 64 with 2-pixel borders; the same grid
  # in TensorBoard.
  grid = np.asarray(Image.open(tmp_path / "straight" / "samples" / "step_00000012.png"))
  assert grid.shape == (2 * 66 + 2, 3 * 66 + 2)
  assert tensorboard_images(tmp_path / "straight" / "tensorboard") == [("samples", 12, (2 * 66 + 2, 3 * 66 + 2))]
  # The training curves: loss, learning rate and the four float eval metrics, two panels per 300-pixel row.
  eval_keys = [k for k in last if k.startswith("eval/") and isinstance(last[k], float)]
  assert len(eval_keys) == 4
  assert Image.open(tmp_path / "straight" / "curves.png").size == (960, 300 * 3)


def tensorboard_images(logdir):
  """(tag, step, (height, width)) of every image summary in a TensorBoard log folder, read by TensorBoard."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"images": 0})
  acc.Reload()
  return [(tag, e.step, (e.height, e.width)) for tag in acc.Tags()["images"] for e in acc.Images(tag)]


def test_sigterm_leaves_a_restorable_checkpoint_at_the_step_reached(tmp_path):
  proc = run_train(tmp_path, background=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  # Acknowledged at once (the stop waits for the step and its checkpoint), then the stop's own line.
  assert ("train.py: SIGTERM received: stopping after this step, with a checkpoint; a second signal stops at once, "
          "without it\n") in err
  reached = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", err).group(1))
  assert reached >= 10 and (tmp_path / "train.lock").read_text() == ""  # the lock released
  state = restore_host_state(tmp_path, small_config())
  assert int(state.step) == reached and checkpoint.all_finite(state.params)


@pytest.mark.slow
def test_a_signal_during_the_end_of_run_work_leaves_a_run_that_a_restart_completes_once(tmp_path):
  # The last step's hooks (here the sample grid; the eval hook is its peer) and curves.png are the end-of-run work.
  flags = ["--stop_at_step=20", "--config.sample.every_steps=1000", "--config.sample.num_samples=4"]
  proc = run_train(tmp_path, *flags, background=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and '"step": 20,' not in (
      metrics.read_text() if metrics.exists() else ""):
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)  # the last step is logged: it is checkpointed, then the end-of-run work starts
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  # Still saving step 20: the loop stops after it. Already in the end-of-run work (step 20 on disk): at once.
  assert ("stopped by SIGTERM at step 20; checkpoint saved" in err or "train.py: stopped by SIGTERM; kept: 20\n" in err
          ), err[-2000:]
  assert not (tmp_path / "curves.png").exists()  # stopped before it (the grid may be done: it is recorded then)
  out = run_train(tmp_path, *flags)
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.search(r"end-of-run work at step 20: (samples, )?curves\.png", out.stderr), out.stderr[-2000:]
  assert json.loads((tmp_path / loop.END_OF_RUN).read_text()) == {"step": 20, "done": ["samples", "curves.png"]}
  assert (tmp_path / "curves.png").exists() and (tmp_path / "samples" / "step_00000020.png").exists()
  assert [image[:2] for image in tensorboard_images(tmp_path / "tensorboard")] == [("samples", 20)]  # drawn once
  assert [json.loads(r)["step"] for r in metrics.read_text().splitlines()] == [5, 10, 15, 20]


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_no_nan_checkpoint(tmp_path):
  out = run_train(tmp_path, "--stop_at_step=50", "--config.checkpoint_every_steps=1",
                  "--config.optim.learning_rate=1e30", "--config.optim.grad_clip_norm=0.0")
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  m = re.fullmatch(r"train\.py: error: loss is (nan|inf|-inf) at step (\d+): training stopped; .*", last)
  assert m, last
  bad_step = int(m.group(2))
  manager = checkpoint.make_manager(str(tmp_path), create=False)
  latest = manager.latest_step()
  manager.close()
  assert latest is None or latest < bad_step
  if latest is not None:
    state = restore_host_state(tmp_path, small_config(**{"optim.learning_rate": 1e30, "optim.grad_clip_norm": 0.0}))
    assert checkpoint.all_finite(state.params) and checkpoint.all_finite(state.ema_params)


@pytest.mark.parametrize("flags, devices, fragment", [
    (["--config.optim.optimizer=sgd"], 1, "optim.optimizer='sgd' is unknown: choose one of adam, adamw"),
    (["--config.optim.learning_rate=-0.1"], 1, "optim.learning_rate=-0.1 is invalid: it must be > 0"),
    (["--config.batch_size=12"], 8, "batch_size=12 is not divisible by the 8 devices: use a multiple of 8"),
    (["--config.image_size=7"], 1, "image size 7x7 is not divisible by 2, which 2 resolution levels need"),
    (["--config.dataset=imagenet"], 1, "dataset='imagenet' is not understood"),
])
def test_bad_config_fails_before_compiling_with_one_line_and_exit_2(tmp_path, flags, devices, fragment):
  start = time.time()
  out = run_train(tmp_path, *flags, devices=devices, env_extra={"JAX_LOG_COMPILES": "1"})
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and "train_step" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: error: ") and fragment in last, last
  assert "Compiling" not in out.stderr  # JAX_LOG_COMPILES logs every compilation: there is none
  assert not (tmp_path / "checkpoints").exists() and time.time() - start < 60


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN's attention in bf16 is allowed on a GPU")
def test_cudnn_attention_off_a_gpu_is_refused_before_anything_is_built():
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top

  config = small_config(**{"model.attention": "cudnn", "model.dtype": "bfloat16"})
  with pytest.raises(ValueError, match=f"^model.attention='cudnn' needs a GPU with cuDNN and model.dtype bfloat16 or "
                                       f"float16, and this run has {jax.default_backend()} devices and "
                                       "model.dtype=bfloat16: use auto"):
    builders.validate(config)
  builders.validate(small_config(**{"model.attention": "xla"}))  # the others pass


def fail_and_kill(procs, why):
  """Kills the processes and fails the test with `why` and their stderr."""
  for p in procs:
    p.kill()
  pytest.fail(f"{why}: " + " | ".join(p.communicate(timeout=60)[1][-1500:] for p in procs))


def wait_until(ready, procs, timeout=240):
  """Waits until ready() while every process still runs; kills them and fails otherwise."""
  deadline = time.time() + timeout
  while not ready():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      fail_and_kill(procs, "a process ended or the wait timed out")
    time.sleep(0.05)


def wait_for_log_lines(workdir, count, procs):
  """Waits until workdir/metrics.jsonl holds `count` lines (the processes must still run)."""
  metrics = workdir / "metrics.jsonl"
  wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= count, procs)


def collect(procs, timeout):
  """(stdout, stderr) of every process once it exits; kills them all and fails the test after `timeout` s."""
  try:
    return [p.communicate(timeout=timeout) for p in procs]
  except subprocess.TimeoutExpired:
    fail_and_kill(procs, f"not every process exited within {timeout} s")


def signal_one_and_collect(procs, index, signum, workdir):
  """Sends `signum` to process `index` once a new line is logged; (seconds until both exited, their stderr)."""
  metrics = workdir / "metrics.jsonl"
  wait_for_log_lines(workdir, (metrics.read_text().count("\n") if metrics.exists() else 0) + 1, procs)
  procs[index].send_signal(signum)
  start = time.time()
  errs = [err for _, err in collect(procs, 120)]
  assert [p.returncode for p in procs] == [128 + signum] * 2, errs
  return time.time() - start, errs


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.multiprocess
def test_checkpoints_move_between_layouts_and_a_signal_to_one_process_stops_every_process(tmp_path):
  # optim.eps=1 keeps Adam's update linear in the gradient (see test_pmap_jit_and_fsdp_on_four_devices_...).
  flags = ["--config.ema.decay=0.5", "--config.optim.eps=1.0"]
  # The first signal follows a log line (every 5 steps) and stops the run within a few steps: END leaves room for it
  # after step 10 on a machine several times faster than this one (3 steps/s here).
  END = 40  # pylint: disable=invalid-name
  fsdp, pmap, jit = (f"--config.parallelism={mode}" for mode in ("fsdp", "pmap", "jit"))
  run, single = tmp_path / "run", tmp_path / "single"
  out = run_train(run, "--stop_at_step=10", fsdp, *flags, devices=4)  # fsdp over 4 devices, one process
  assert out.returncode == 0, out.stderr[-2000:]
  shutil.copytree(run, single)
  # ... resumed on 1 device: the never-interrupted reference of what follows
  out = run_train(single, f"--stop_at_step={END}", fsdp, *flags, devices=1)
  assert out.returncode == 0, out.stderr[-2000:]
  # ... and on 2 processes x 2 devices: started as a SLURM job (no flags say there are several processes) under
  # fsdp, stopped by SIGTERM to process 1 alone
  seconds, errs = signal_one_and_collect(start_two_processes(run, f"--stop_at_step={END}", fsdp, *flags, slurm=True),
                                         1, signal.SIGTERM, run)
  assert "slurm job detected: process 0 of 2" in errs[0], errs[0]
  stops = [int(m.group(1)) for m in (re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", e)
                                     for e in errs) if m]
  assert len(stops) == 2 and stops[0] == stops[1] < END, errs  # both stop, at one step, before the end
  assert seconds < 60
  steps = checkpoint_steps(run)
  assert len(steps) == 2 and steps[-1] == stops[0], steps  # one common checkpoint: written by both together
  # ... resumed with the flags under pmap to the end, where a SIGINT to process 0 once the last step is logged stops
  # both before the end-of-run work is done (the grid of the last step, curves.png); the last checkpoint is kept
  procs = start_two_processes(run, f"--stop_at_step={END}", pmap, *flags)
  wait_until(lambda: f'"step": {END},' in (run / "metrics.jsonl").read_text(), procs)
  procs[0].send_signal(signal.SIGINT)
  errs = [err for _, err in collect(procs, 120)]
  assert [p.returncode for p in procs] == [128 + signal.SIGINT] * 2, errs
  assert all(f"stopped by SIGINT at step {END}; checkpoint saved" in e for e in errs), errs
  assert "on 4 device(s) in 2 process(es)" in errs[0] and checkpoint_steps(run) == [10, stops[0], END]
  assert "curves.png" not in loop.end_of_run_done(str(run), END)  # (the one of the run to step 10 is there)
  # ... restarted under jit, with process 1 listing no checkpoint (on NFS listings can differ): both resume from
  # process 0's choice, the last step, and do the end-of-run work left, once
  procs = start_two_processes(run, f"--stop_at_step={END}", jit, *flags,
                              env_extra=fault_env("orbax.checkpoint:CheckpointManager.all_steps:1:0:empty"))
  errs = [err for _, err in collect(procs, 300)]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
  assert all(f"resumed from the checkpoint of step {END}" in e for e in errs), errs
  assert (run / "samples" / f"step_{END:08d}.png").exists()  # the last step's grid, sampled by both processes
  assert loop.end_of_run_done(str(run), END) == ["samples", "curves.png"]
  assert [image[:2] for image in tensorboard_images(run / "tensorboard")].count(("samples", END)) == 1
  config = small_config(**{"ema.decay": 0.5, "optim.eps": 1.0})
  a, b = restore_host_state(single, config, END), restore_host_state(run, config, END)
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema_params, a.opt_state)),
                  jax.tree_util.tree_leaves((b.params, b.ema_params, b.opt_state))):
    # The same per-example noise and data; only the all-reduce order differs (float32 rounding).
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  sampled = run_script("sample.py", f"--workdir={run}", "--num_samples=4", f"--out={tmp_path / 'samples.png'}")
  assert sampled.returncode == 0 and np.load(tmp_path / "samples.npz")["images"].shape == (4, 8, 8, 1), sampled.stderr


@pytest.mark.multiprocess
def test_a_process_that_dies_makes_the_others_fail_within_the_heartbeat_timeout(tmp_path):
  procs = start_two_processes(tmp_path, "--stop_at_step=100000", "--heartbeat_timeout=5")
  wait_until((tmp_path / "config.json").exists, procs)  # both processes are connected and building the run
  procs[1].kill()
  start = time.time()
  (_, err), _ = collect(procs, 120)
  # The bound: the heartbeat timeout, plus the coordination service's polling and a loaded machine's slack.
  assert procs[0].returncode != 0 and time.time() - start < 5 + 20, (procs[0].returncode, err[-2000:])
  assert "another task died" in err


@pytest.mark.parametrize("shape, devices, axis", [
    ((3, 3, 8, 16), 4, 3),       # a conv kernel: the output channels
    ((3, 3, 64, 32), 4, 2),      # input channels larger than output: the largest axis, not the last
    ((8, 12), 4, 1),             # both divisible: the larger, not the first
    ((6, 8), 4, 1),              # the larger (6) is not divisible by 4: the next largest
    ((8, 8, 3), 4, 0),           # a tie: the first
    ((3, 5), 4, None),           # none divisible: replicated
    ((), 2, None),               # a scalar (the step, Adam's count): replicated
])
def test_fsdp_shards_the_largest_axis_the_device_count_divides(shape, devices, axis):
  from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top

  want = tuple(parallel.MESH_AXIS if a == axis else None for a in range(len(shape))) if axis is not None else ()
  assert tuple(parallel.fsdp_spec(shape, devices)) == want


@pytest.mark.slow
def test_pmap_jit_and_fsdp_on_four_devices_match_one_device():
  code = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, numpy as np
      import configs.default as d
      from ddpm_jax import builders, images, parallel
      from ddpm_jax.train_state import create_train_state
      assert jax.device_count() == 4
      c = d.get_config()
      c.model.update({SMALL_MODEL!r})
      c.optim.warmup_steps, c.ema.decay = 0, 0.5
      # Biases feeding a GroupNorm have a zero true gradient, so their float32 gradient is rounding noise
      # whose sign Adam's first step (lr·g/(|g|+eps)) would turn into ±lr. With eps = 1 the update is
      # lr·g/(|g|+1) ≈ lr·g: linear in g, so the comparison sees float32 differences, not signs of noise.
      c.optim.eps = 1.0
      s = jax.device_get(create_train_state(builders.build_model(c), builders.build_optimizer(c), jax.random.key(0),
                                            (1, 8, 8, 1)))
      batches = np.asarray(jax.random.uniform(jax.random.key(1), (30, 16, 8, 8, 1), minval=-1, maxval=1))
      key = jax.random.key(2)
      step = builders.build_train_step(c, builders.build_schedule(c))
      one = s
      for b in batches:
        one, m1 = jax.jit(step)(one, jnp.asarray(b), key)
      # sample.py's sampler (over the 4 devices), on the EMA parameters of each run
      generate = builders.build_generator(c, builders.build_model(c), builders.build_schedule(c),
                                          builders.sampler_options(c))
      draw = lambda ema: images.to_uint8(generate(ema, jax.random.key(3), 16)).astype(int)
      reference = draw(one.ema_params)
      for mode in ("pmap", "jit", "fsdp"):
        runner = parallel.make_runner(step, mode)
        placed = runner.put_state(s)
        if mode == "fsdp":  # a 3x3x8x16 kernel is split along its largest axis (16 output channels), 4 each
          kernel = placed.params["down_1_res_0"]["Conv_0"]["kernel"]
          assert kernel.shape == (3, 3, 8, 16) and tuple(kernel.sharding.spec) == (None, None, None, "data"), \\
              kernel.sharding
          assert kernel.addressable_shards[0].data.shape == (3, 3, 8, 4)
          # Created in those shardings from the start (each device computes its shards): the same bits.
          made = create_train_state(builders.build_model(c), builders.build_optimizer(c), jax.random.key(0),
                                    (1, 8, 8, 1), runner.state_shardings)
          for a, b in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(made)):
            assert a.sharding == b.sharding, (a.sharding, b.sharding)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for b in batches:
          placed, m = runner.step(placed, runner.put_batch(b), key)
        got = runner.get_state(placed)
        assert int(got.step) == 30
        m = runner.get_metrics(m)
        for k in ("loss", "grad_norm"):
          np.testing.assert_allclose(m[k], float(m1[k]), rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves((one.params, one.ema_params, one.opt_state)),
                        jax.tree_util.tree_leaves((got.params, got.ema_params, got.opt_state))):
          # Only the reduction order of the batch mean differs: float32 rounding.
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        # Parameters equal to float32 rounding give the same 8-bit images but for rare flips by one level, where a
        # value lies within rounding of a level boundary.
        diff = np.abs(draw(got.ema_params) - reference)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        print("OK", mode)
  """)
  # 600 s: a 2-core machine shared with other test runs took just over 300 s.
  out = run_python("-c", code, devices=4, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["OK", "pmap", "OK", "jit", "OK", "fsdp"]
