"""Metric writing: metrics.jsonl, TensorBoard event files read back with TensorBoard's own reader, resumed runs,
Weights & Biases."""

import json
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from ddpm_jax import reporting


def tensorboard(workdir):
  """TensorBoard's view of a run's event files."""
  acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return acc


def test_scalars_and_images_reach_tensorboard_and_metrics_jsonl(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  for step in (10, 20):
    writer.write(step, {"loss": 1.0 / step, "lr": 2e-4})
  gray = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8, 1)
  writer.write_image(20, "samples", gray)
  writer.close()
  acc = tensorboard(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
  (image,) = acc.Images("samples")
  assert (image.step, image.width, image.height) == (20, 8, 6)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 10, "loss": 0.1, "lr": 2e-4}, {"step": 20, "loss": 0.05, "lr": 2e-4}]


def test_a_resumed_run_shows_each_step_once(tmp_path):
  # The first run logged steps 10..40 but its last checkpoint is of step 20: the resumed run logs 30 and 40 again.
  first = reporting.MetricWriter(str(tmp_path))
  for step in (10, 20, 30, 40):
    first.write(step, {"loss": 1.0})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 50, "lo')  # the torn last line of a killed process
  resumed = reporting.MetricWriter(str(tmp_path), start_step=20)
  for step in (30, 40, 50):
    resumed.write(step, {"loss": 2.0})
  resumed.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["loss"]) for r in rows] == [(10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0), (50, 2.0)]
  assert [(e.step, e.value) for e in tensorboard(tmp_path).Scalars("loss")] == [
      (10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0), (50, 2.0)]


def test_weights_and_biases_gets_the_same_scalars_when_asked_and_a_clear_error_when_missing(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"^wandb.project='demo' needs the wandb package, which is not installed: "
                                       r"pip install wandb"):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    reporting.check_wandb("demo")
  reporting.check_wandb(None)  # off: nothing is needed
  logged, runs = [], []
  fake = types.ModuleType("wandb")
  fake.__spec__ = types.SimpleNamespace(name="wandb")
  fake.Image = lambda array: ("image", array.shape)

  def init(**kw):
    runs.append(kw)
    return types.SimpleNamespace(log=lambda data, step: logged.append((step, data)), finish=lambda: None)
  fake.init = init
  monkeypatch.setitem(sys.modules, "wandb", fake)
  writer = reporting.MetricWriter(str(tmp_path), wandb_project="demo", config={"seed": 3})
  writer.write(5, {"loss": 0.5})
  writer.write_image(5, "samples", np.zeros((4, 4, 3), np.uint8))
  writer.close()
  assert runs[0]["project"] == "demo" and runs[0]["config"] == {"seed": 3}
  assert logged == [(5, {"loss": 0.5}), (5, {"samples": ("image", (4, 4, 3))})]
