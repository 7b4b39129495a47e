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


def ema(values, weight=0.9):
  """TensorBoard's debiased exponential moving average, NaNs skipped (written independently of plots.smooth)."""
  out, acc, n = [], 0.0, 0
  for v in values:
    if math.isfinite(v):
      acc, n = weight * acc + (1 - weight) * v, n + 1
      out.append(acc / (1 - weight ** n))
    else:
      out.append(math.nan)
  return out


def pixel(panel, step, value):
  """The pixel of (step, value) on a linear panel, from the documented mapping."""
  x0, y0, x1, y1 = panel.box
  return (x0 + (step - panel.x_lo) / (panel.x_hi - panel.x_lo) * (x1 - 1 - x0),
          y1 - 1 - (value - panel.y_lo) / (panel.y_hi - panel.y_lo) * (y1 - 1 - y0))


def window(img, x, y, r=2):
  """The (2r+1)-square of an [H, W, 3] image around pixel (x, y)."""
  x, y = round(x), round(y)
  return img[y - r:y + r + 1, x - r:x + r + 1]


def dark(region):
  """Whether any pixel of the region is dark (all channels below 130)."""
  return bool((region < 130).all(axis=-1).any())


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


def test_plot_draws_the_smoothed_loss_dark_and_the_raw_loss_light(tmp_path):
  rng = np.random.default_rng(0)
  steps = np.arange(100, 10001, 100)
  loss = 1.0 + 0.05 * rng.normal(size=steps.size)
  loss[40] = 2.5  # a spike the smoothed line does not follow
  loss[60] = np.nan
  rows = []
  for s, v in zip(steps, loss):
    rows.append({"step": int(s), "loss": float(v), "lr": 1e-4 * min(1.0, s / 2000), "steps_per_s": 9.0})
    if s % 5000 == 0:  # an eval row follows the training row of its step
      rows.append({"step": int(s), "eval/fid": 40.0 if s == 5000 else 20.0})
  out = tmp_path / "curves.png"
  panels = plots.plot_training_curves(write_jsonl(tmp_path / "metrics.jsonl", rows), str(out), width=700,
                                      height=500)
  with Image.open(out) as im:
    assert im.size == (700, 500) and im.mode == "RGB"
    img = np.asarray(im)
  assert [p.keys[0] for p in panels] == ["loss", "lr", "eval/fid"]
  lp = panels[0]
  assert not lp.log_y and (lp.x_lo, lp.x_hi) == (100, 10000)
  x0, y0, x1, y1 = lp.box
  assert 0 <= x0 < x1 <= 350 and 0 <= y0 < y1 <= 250  # top-left cell of a 2 x 2 grid
  smoothed = ema(loss)
  for i in range(0, steps.size, 7):
    if math.isfinite(smoothed[i]):
      assert dark(window(img, *pixel(lp, steps[i], smoothed[i]))), f"no smoothed line at step {steps[i]}"
  spike = window(img, *pixel(lp, steps[40], loss[40]), r=1)
  assert (spike != 255).any() and not dark(spike)  # the raw line is there, light
  # Above the data (between the spike and the next ones) the plot area is background or light grid.
  free = img[y0 + 2:round(pixel(lp, 0, 1.6)[1]), x0 + 2:round(pixel(lp, steps[30], 0)[0])]
  assert free.size and not dark(free)
  # The learning rate: a dark line through its first and last points; eval: dark dots at its two steps.
  for p, (s, v) in [(panels[1], (100, 5e-6)), (panels[1], (10000, 1e-4)), (panels[2], (5000, 40.0)),
                    (panels[2], (10000, 20.0))]:
    assert dark(window(img, *pixel(p, s, v))), (p.title, s)
  # The panel titles and tick labels are drawn (black text above and left of the plot area).
  assert dark(img[y0 - 22:y0 - 4, x0:x0 + 40]) and dark(img[y0:y1, x0 - 60:x0 - 6])


def test_plot_handles_one_row_constant_series_nan_and_rows_given_directly(tmp_path):
  out = str(tmp_path / "one.png")
  panels = plots.plot_training_curves([{"step": 7, "loss": 0.5, "lr": 1e-4}], out, width=400, height=180)
  with Image.open(out) as im:
    assert im.size == (400, 180)
    img = np.asarray(im)
  assert dark(window(img, *pixel(panels[0], 7, 0.5)))  # a lone point is a dot
  rows = [{"step": s, "loss": 0.25 if s != 3 else float("nan"), "lr": 2e-4} for s in range(1, 9)]
  panels = plots.plot_training_curves(rows, out)
  with Image.open(out) as im:
    assert im.size == (960, 300)
    img = np.asarray(im)
  assert all(p.y_lo < 0.25 < p.y_hi for p in panels[:1]) and panels[1].y_lo < 2e-4 < panels[1].y_hi
  assert dark(window(img, *pixel(panels[0], 5, 0.25)))
  # Only a loss: one full-width panel; a loss spanning decades gets a log axis.
  panels = plots.plot_training_curves([{"step": s, "loss": 10.0 ** -s} for s in range(4)], out, width=300)
  assert len(panels) == 1 and panels[0].log_y and panels[0].box[2] > 250
  with pytest.raises(ValueError, match="no finite"):
    plots.plot_training_curves([{"step": 1, "loss": float("nan")}], out)


def test_tick_helpers():
  assert plots.nice_ticks(0, 10000) == [0, 2000, 4000, 6000, 8000, 10000]
  assert plots.nice_ticks(0.012, 0.047, 4) == [0.02, 0.03, 0.04]
  assert plots.log_ticks(0.004, 0.6) == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
  assert [plots.format_number(v) for v in (0, 250, 12000, 150000, 2.5e6, 0.03, 2e-5)] == [
      "0", "250", "12000", "150k", "2.5M", "0.03", "2e-05"]
