"""sample.py end to end on a tiny checkpoint written by the test, and its errors."""

import functools
import json
import os
import re
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import configs.default as default_config
from ddpm_jax import builders, figures, images, run_record, sampling
from ddpm_jax.data import load_digits
from helpers import ROOT, SMALL_MODEL_FLAGS, python_path, run_sample, run_train, save_checkpoints, small_config, stop


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with a step-0 checkpoint of the small model."""
  path = tmp_path_factory.mktemp("run")
  save_checkpoints(small_config(), path)
  return path


@pytest.mark.slow
def test_sample_writes_grid_npz_and_figures(workdir, tmp_path, imported_tensorflow):
  out = tmp_path / "s.png"
  res = run_sample(f"--workdir={workdir}", "--num_samples=11", "--batch_size=4", "--method=ddim", "--steps=5",
                   "--eta=0.5", f"--out={out}", "--figures", "--eval", python_flags=("-X", "importtime"))
  assert res.returncode == 0, res.stderr[-3000:]
  assert imported_tensorflow(res.stderr) == []  # no TensorFlow in the sampling process
  assert "sampling 11 images in batches of 4 " in res.stdout and "sampled 11/11" in res.stdout
  arr = np.load(tmp_path / "s.npz")["images"]
  assert arr.shape == (11, 8, 8, 1) and arr.dtype == np.uint8 and arr.std() > 0
  # The grid: ceil(sqrt(11)) = 4 columns, 3 rows of 8-pixel images enlarged 8x to 64 (the least factor reaching
  # 64 pixels a side), with 2-pixel borders.
  assert Image.open(out).size == (4 * 66 + 2, 3 * 66 + 2)
  # Figures: the same tiles and borders, a 6-pixel margin all round, and 28-pixel bands for the title and the
  # column headers (a 16-pixel text line with 6 pixels above and below).
  figure = lambda rows, cols, bands: (cols * 66 + 2 + 12, rows * 66 + 2 + 12 + 28 * bands)
  assert Image.open(tmp_path / "s_forward.png").size == figure(4, 6, 2)
  assert Image.open(tmp_path / "s_ten.png").size == figure(2, 5, 1)
  assert Image.open(tmp_path / "s_trajectory.png").size == figure(4, 5, 2)
  assert "t = 800, 600, 400, 200, 0" in res.stdout
  result = json.loads((workdir / "eval_step_0.json").read_text())
  assert result["num_samples"] == 11 and result["step"] == 0 and result["method"] == "ddim"
  assert len(result["class_fractions"]) == 10 and result["frechet_floor_real_vs_real"] > 0
  assert "eval: 11 samples:" in res.stdout


def test_workdir_without_checkpoint_is_a_clear_error(tmp_path):
  res = run_sample(f"--workdir={tmp_path}", f"--out={tmp_path}/x.png")
  assert res.returncode == 2
  assert res.stderr.strip().splitlines()[-1] == (
      f"sample.py: error: no checkpoint in {tmp_path}/checkpoints: train first with "
      f"`python train.py --workdir {tmp_path}`")


def test_checkpoint_of_another_model_is_a_clear_error(workdir, tmp_path):
  res = run_sample(f"--checkpoint={workdir}/checkpoints/0", f"--config={ROOT}/configs/default.py",
                   f"--out={tmp_path}/x.png")
  assert res.returncode == 2
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("sample.py: error: checkpoint 0 in ") and "was written by another model or optimizer" in last
  assert "ema_params/" in last  # only the EMA parameters are read


def test_sampling_reads_only_the_ema_params_so_another_optimizer_section_works(workdir, tmp_path):
  # Adam has no weight-decay state and MultiSteps wraps the state in another structure: restoring the optimizer
  # state under this config would fail; sampling never reads it.
  res = run_sample(f"--workdir={workdir}", f"--config={ROOT}/configs/default.py", *SMALL_MODEL_FLAGS,
                   "--config.optim.optimizer=adam",
                   "--config.optim.grad_accum_steps=4", "--num_samples=2", "--steps=2", f"--out={tmp_path}/x.png")
  assert res.returncode == 0, res.stderr[-3000:]
  assert np.load(tmp_path / "x.npz")["images"].shape == (2, 8, 8, 1)


@pytest.mark.slow
def test_eval_of_a_folder_dataset_reports_fid_with_the_given_weights(tmp_path, inception_weights):
  images = tmp_path / "digits"
  images.mkdir()
  for i, digit in enumerate(load_digits()[0][:8]):
    Image.fromarray(digit[:, :, 0]).save(images / f"{i}.png")
  config = default_config.get_config()
  config.dataset = f"folder:{images}"
  save_checkpoints(config, tmp_path / "run")
  # --config gives a locked config without the key: the flag must still reach the evaluator.
  res = run_sample(f"--workdir={tmp_path / 'run'}", f"--config={ROOT}/configs/default.py",
                   f"--config.dataset=folder:{images}", "--num_samples=4", "--steps=2", f"--out={tmp_path}/s.png",
                   "--eval", f"--inception_weights={inception_weights}")
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.loads((tmp_path / "run" / "eval_step_0.json").read_text())
  assert (result["evaluator"], result["num_samples"], result["num_real"]) == ("inception", 4, 8)
  assert result["fid"] > 0 and 1 <= result["inception_score"] <= 1008
  assert "eval: 4 samples vs 8 real: FID" in res.stdout


@pytest.mark.slow
def test_v_prediction_with_min_snr_trains_and_samples_with_dpm_solver(tmp_path):
  res = run_train(tmp_path, "--stop_at_step=4", "--config.diffusion.prediction=v",
                  "--config.diffusion.loss_weighting=min_snr")
  assert res.returncode == 0, res.stderr[-3000:]
  (row,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert row["step"] == 4 and 0 < row["loss"] < 2
  # The checkpoint's config says v: sample.py converts the output without being told.
  assert json.loads((tmp_path / "config.json").read_text())["diffusion"]["prediction"] == "v"
  flags = ["--method=dpmpp_2m", "--steps=20", "--num_samples=4"]
  res = run_sample(f"--workdir={tmp_path}", *flags, f"--out={tmp_path}/v.png")
  assert res.returncode == 0, res.stderr[-3000:]
  got = np.load(tmp_path / "v.npz")["images"]
  assert "with dpmpp_2m" in res.stdout and got.shape == (4, 8, 8, 1)
  # Beside them, what made them: the checkpoint, the sampler, and the run record's row of the training start.
  made = json.loads((tmp_path / "v.json").read_text())
  assert (made["checkpoint_step"], made["sampler"]["method"], made["sampler"]["num_steps"]) == (4, "dpmpp_2m", 20)
  assert made["run"] == run_record.read(str(tmp_path))[0] and made["run"]["resumed_from"] is None
  # A --config that says eps does not override what the checkpoint's network predicts.
  res = run_sample(f"--workdir={tmp_path}", f"--config={ROOT}/configs/default.py", *SMALL_MODEL_FLAGS, *flags,
                   f"--out={tmp_path}/c.png")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "the checkpoint's network predicts 'v'; using that" in res.stderr
  np.testing.assert_array_equal(np.load(tmp_path / "c.npz")["images"], got)
  # The samples are the v-conversion's, and the eps conversion of the same network gives others.
  config = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
  params = builders.restore_sampling_params(config, str(tmp_path), 4)
  eps_fn = functools.partial(builders.model_fn(builders.build_model(config)), params)
  draw = lambda prediction: images.to_uint8(sampling.sample(
      eps_fn, builders.build_schedule(config), jax.random.key(0), (4, 8, 8, 1), method="dpmpp_2m", num_steps=20,
      prediction=prediction))
  # float32 rounding may flip a pixel across a uint8 level, rarely: at most 1 level apart, almost all equal.
  assert np.abs(draw("v").astype(int) - got).max() <= 1 and (draw("v") == got).mean() > 0.99
  assert (draw("eps") != got).mean() > 0.5


@pytest.mark.slow
def test_a_guided_model_trains_on_digit_labels_and_draws_the_classes_asked_for(tmp_path, workdir):
  res = run_train(tmp_path, "--stop_at_step=4", "--config.sample.every_steps=4", "--config.sample.num_samples=20",
                  "--config.sample.num_steps=2", config=f"{ROOT}/configs/digits_guided.py")
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads((tmp_path / "classes.json").read_text()) == {str(k): str(k) for k in range(10)}
  assert json.loads((tmp_path / "config.json").read_text())["model"]["num_classes"] == 10
  # The training grid: one class per row, 20 samples as 10 rows of 2 (8x8 enlarged to 64, 2-pixel borders).
  assert Image.open(tmp_path / "samples" / "step_00000004.png").size == (2 * 66 + 2, 10 * 66 + 2)
  res = run_sample(f"--workdir={tmp_path}", "--labels=all", "--guidance=3", "--num_samples=20", "--steps=2",
                   f"--out={tmp_path}/all.png")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "classes all, guidance 3" in res.stdout
  saved = np.load(tmp_path / "all.npz")
  np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 2))
  assert saved["images"].shape == (20, 8, 8, 1)
  assert Image.open(tmp_path / "all.png").size == (2 * 66 + 2, 10 * 66 + 2)
  res = run_sample(f"--workdir={tmp_path}", "--labels=0,3,9", "--num_samples=5", "--steps=2", "--figures",
                   f"--out={tmp_path}/some.png")
  assert res.returncode == 0, res.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "some.npz")["labels"], [0, 0, 3, 3, 9])
  assert (tmp_path / "some_ten.png").exists() and (tmp_path / "some_trajectory.png").exists()
  assert figures.ten_indices(np.array([0, 0, 3, 3, 9]), 5) == [0, 2, 4, 1, 3]  # one of each class first
  for flag, message in [("--labels=12", "--labels=12: class 12 does not exist: the model has classes 0..9"),
                        ("--labels=seven", "--labels=seven is not understood: give a class (7), a list (0,3,9) or "
                                           "'all'")]:
    res = run_sample(f"--workdir={tmp_path}", flag, f"--out={tmp_path}/x.png")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == f"sample.py: error: {message}"
  # An unconditional checkpoint has no classes to ask for.
  res = run_sample(f"--workdir={workdir}", "--labels=7", f"--out={tmp_path}/x.png")
  assert res.returncode == 2
  assert res.stderr.strip().splitlines()[-1].startswith("sample.py: error: --labels=7 needs a class-conditional "
                                                        "model: this checkpoint's model is unconditional")


def test_progress_rate_and_eta_leave_the_first_call_out(monkeypatch, capsys):
  from ddpm_jax import reporting  # pylint: disable=g-import-not-at-top

  clock = iter([100.0, 110.0, 111.0, 113.0])  # created; first batch after 10 s (compiling); then 1 s, 2 s a batch
  monkeypatch.setattr(reporting.time, "time", lambda: next(clock))
  report = reporting.progress_printer("sampled")
  for done in (25, 50, 75):
    report(done, 100)
  # First line: only the creation to go on, 25 in 10 s (an upper bound: 75 left at 2.5/s = 30 s). Then the rate
  # since the first call: 25 in 1 s (50 left: 2 s), 50 in 3 s (25 left: 1.5 s, shown as 1 s).
  assert capsys.readouterr().out.splitlines() == ["sampled 25/100 | 2.5/s | ETA 0:00:30",
                                                  "sampled 50/100 | 25.0/s | ETA 0:00:02",
                                                  "sampled 75/100 | 16.7/s | ETA 0:00:01"]
  clock = iter([0.0, 0.0])
  reporting.progress_printer("sampled")(0, 10)  # nothing done yet, no time passed: no rate to go on
  assert capsys.readouterr().out == "sampled 0/10 | 0.0/s | ETA unknown\n"


@pytest.mark.slow  # 21 s on a loaded 2-core machine (start-up, the sampler's compile, its first batch)
def test_sigint_while_sampling_ends_within_seconds_with_one_line(workdir, tmp_path):
  out = tmp_path / "s.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path())
  # 2048 batches of 2 samples, 50 model calls each: minutes of sampling.
  proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "sample.py"), f"--workdir={workdir}",
                           "--num_samples=4096", "--batch_size=2", "--method=ddim", "--steps=50", f"--out={out}"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("sampled "):  # the first batch is done: it is sampling the next ones
      break
  seconds, lines = stop(proc, signal.SIGINT)
  assert proc.returncode == 130 and seconds < 5, (proc.returncode, seconds)
  assert lines == ["sample.py: stopped by SIGINT"]
  assert not out.exists() and not (tmp_path / "s.npz").exists()


NLL_LINE = re.compile(r"^bits/dim: (\d+\.\d{4}) ± (\d+\.\d{4}) over 6 images "
                      r"\(prior (\S+) \+ decoder (\S+) \+ KL terms (\S+); "
                      r"the training images of digits, which has no test split; variance fixed_large\)$", re.M)


def test_nll_prints_the_bound_with_its_parts_and_writes_it_beside_out(workdir, tmp_path):
  res = run_sample(f"--workdir={workdir}", "--nll=6", "--batch_size=4", "--variance=fixed_large",
                   f"--out={tmp_path}/new/nll.png")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "bound: images 4/6" in res.stdout and "bound: images 6/6" in res.stdout  # progress after each batch
  total, se, prior, decoder, kl = map(float, NLL_LINE.search(res.stdout).groups())
  assert total == pytest.approx(prior + decoder + kl, abs=2e-4) and se > 0  # four printed decimals each
  saved = json.loads((tmp_path / "new" / "nll.json").read_text())
  assert (saved["num_images"], saved["variance"], saved["step"], len(saved["terms"])) == (6, "fixed_large", 0, 1000)
  assert round(saved["bits_per_dim"], 4) == total and saved["decoder"] == saved["terms"][0]
  # The total is summed per image in float32 (~1e-7 relative), its parts averaged in float64.
  assert sum(saved["terms"]) + saved["prior"] == pytest.approx(saved["bits_per_dim"], rel=1e-6)
  res = run_sample(f"--workdir={workdir}", "--nll=1798")
  assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
      "sample.py: error: 1798 images were asked for the likelihood bound, more than the 1797 of the training images "
      "of digits, which has no test split")


@pytest.mark.slow
def test_a_learned_variance_checkpoint_samples_with_respaced_ddpm(tmp_path):
  from configs import digits_hybrid  # pylint: disable=g-import-not-at-top

  config = digits_hybrid.get_config()
  config.model.base_channels, config.model.channel_mult = 8, (1, 2)
  save_checkpoints(config, tmp_path)
  res = run_sample(f"--workdir={tmp_path}", "--method=ddpm", "--steps=10", "--num_samples=3", f"--out={tmp_path}/s.png")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "with ddpm" in res.stdout and np.load(tmp_path / "s.npz")["images"].shape == (3, 8, 8, 1)
