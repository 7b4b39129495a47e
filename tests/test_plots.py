"""Tests for ddpm_jax.plots: reading metrics.jsonl and drawing the training curves."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import plots


def write_jsonl(path, rows, tail: str = "") -> str:
  """Writes rows as JSON lines (NaN as JSON's NaN, as MetricWriter does), then `tail` unterminated."""
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write(tail)
  return str(path)


def centred_mean(values, half_width):
  """Each finite point's mean with its finite neighbours within a symmetric window, shrunk at the ends (written
  independently of plots.smooth)."""
  v = np.asarray(values, float)
  out = []
  for i in range(len(v)):
    h = min(half_width, i, len(v) - 1 - i)
    near = [x for x in v[i - h:i + h + 1] if math.isfinite(x)]
    out.append(sum(near) / len(near) if math.isfinite(v[i]) else math.nan)
  return np.array(out)


def test_read_metrics_keeps_the_last_row_of_a_repeated_step_and_merges_eval_rows(tmp_path):
  rows = [{"step": 10, "loss": 1.0, "lr": 1e-4}, {"step": 20, "loss": 0.9, "lr": 1e-4},
          {"step": 20, "eval/fid": 50.0},
          {"step": 30, "loss": 0.8, "lr": 1e-4}, {"step": 40, "loss": 0.7, "lr": 1e-4},
          # a resumed run, from the checkpoint of step 20
          {"step": 30, "loss": 0.75, "lr": 2e-4}, {"step": 35, "loss": 0.72, "lr": 2e-4},
          {"step": 35, "loss": 0.71, "lr": 2e-4}]
  path = write_jsonl(tmp_path / "metrics.jsonl", rows, tail='{"step": 40, "loss": 0.6')
  got = plots.read_metrics(path)
  assert got == [{"step": 10, "loss": 1.0, "lr": 1e-4}, {"step": 20, "loss": 0.9, "lr": 1e-4, "eval/fid": 50.0},
                 {"step": 30, "loss": 0.75, "lr": 2e-4}, {"step": 35, "loss": 0.71, "lr": 2e-4}]


def test_read_metrics_names_the_path_of_a_missing_or_empty_file(tmp_path):
  with pytest.raises(ValueError, match=f"no metrics file at {tmp_path / 'nope.jsonl'}$"):
    plots.read_metrics(str(tmp_path / "nope.jsonl"))
  empty = write_jsonl(tmp_path / "empty.jsonl", [], tail="\n")
  with pytest.raises(ValueError, match="empty.jsonl"):
    plots.read_metrics(empty)
  with pytest.raises(ValueError, match="empty.jsonl"):
    plots.plot_training_curves(empty, str(tmp_path / "c.png"))


def test_the_smoothed_loss_follows_a_falling_curve_without_lag():
  # The default run's shape: a loss falling steeply, logged as 100-step means with noise of s.d. 0.01.
  rng = np.random.default_rng(1)
  steps = np.arange(100, 6001, 100)
  true = 0.08 + 0.3 * np.exp(-steps / 800)
  logged = true + 0.01 * rng.normal(size=steps.size)
  smoothed = plots.smooth(logged)
  np.testing.assert_allclose(smoothed, centred_mean(logged, plots.SMOOTH_HALF_WIDTH), rtol=1e-12)
  # Unbiased: the smoothed curve lies among the logged points, about half of them above it (a trailing average
  # lies above nearly all of them on a falling curve). Binomial(60, 1/2): s.d. 0.065; allow 3 s.d.
  above = np.mean(logged > smoothed)
  assert 0.3 < above < 0.7, above
  # Within the points' spread of the true curve: the worst residual of the raw points bounds the smoothed one's.
  assert np.max(np.abs(smoothed - true)) < np.max(np.abs(logged - true))
  nan = logged.copy()
  nan[[0, 30]] = np.nan
  got = plots.smooth(nan)
  assert np.isnan(got[[0, 30]]).all() and np.isfinite(np.delete(got, [0, 30])).all()
  np.testing.assert_allclose(got, centred_mean(nan, plots.SMOOTH_HALF_WIDTH), rtol=1e-12)


def test_plot_draws_each_series_on_its_own_panel(tmp_path):
  rng = np.random.default_rng(0)
  steps = np.arange(100, 10001, 100)
  loss = 1.0 + 0.05 * rng.normal(size=steps.size)
  loss[60] = np.nan
  rows = []
  for s, v in zip(steps, loss):
    rows.append({"step": int(s), "loss": float(v), "lr": 1e-4 * min(1.0, s / 2000), "steps_per_s": 9.0})
    if s % 5000 == 0:  # an eval row follows the training row of its step
      rows.append({"step": int(s), "eval/fid": 40.0 if s == 5000 else 20.0})
  out = tmp_path / "curves.png"
  fig = plots.plot_training_curves(write_jsonl(tmp_path / "metrics.jsonl", rows), str(out), width=700, height=500)
  with Image.open(out) as im:
    assert im.size == (700, 500)
  loss_ax, lr_ax, fid_ax = fig.axes
  assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "eval/fid"]
  raw, smoothed = loss_ax.lines
  np.testing.assert_array_equal(raw.get_xdata(), steps)
  np.testing.assert_array_equal(raw.get_ydata(), loss)  # NaN kept: a gap in the line
  np.testing.assert_allclose(smoothed.get_ydata(), centred_mean(loss, plots.SMOOTH_HALF_WIDTH), rtol=1e-12)
  assert loss_ax.get_yscale() == "linear"
  np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), [1e-4 * min(1.0, s / 2000) for s in steps])
  np.testing.assert_array_equal(fid_ax.lines[0].get_xydata(), [[5000, 40.0], [10000, 20.0]])
  assert fid_ax.lines[0].get_marker() == "o"


def test_plot_handles_one_row_constant_series_nan_and_rows_given_directly(tmp_path):
  out = str(tmp_path / "one.png")
  fig = plots.plot_training_curves([{"step": 7, "loss": 0.5, "lr": 1e-4}], out, width=400, height=180)
  with Image.open(out) as im:
    assert im.size == (400, 180)
  assert fig.axes[0].lines[0].get_xydata().tolist() == [[7.0, 0.5]]
  rows = [{"step": s, "loss": 0.25 if s != 3 else float("nan"), "lr": 2e-4} for s in range(1, 9)]
  fig = plots.plot_training_curves(rows, out)
  with Image.open(out) as im:
    assert im.size == (960, plots.PANEL_HEIGHT)  # two panels side by side
  assert len(fig.axes) == 2
  # Only a loss: one panel; a loss spanning decades gets a log axis.
  fig = plots.plot_training_curves([{"step": s, "loss": 10.0 ** -s} for s in range(4)], out, width=300)
  assert len(fig.axes) == 1 and fig.axes[0].get_yscale() == "log"
  with pytest.raises(ValueError, match="no finite"):
    plots.plot_training_curves([{"step": 1, "loss": float("nan")}], out)
