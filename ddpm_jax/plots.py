"""Training curves from metrics.jsonl with matplotlib (Agg): loss (raw and centred mean), learning rate, evaluation."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
from etils import epath

from ddpm_jax import storage

if TYPE_CHECKING:  # the annotation only: matplotlib is imported when a plot is drawn
  import matplotlib.figure

LOSS_KEY, LR_KEY, EVAL_PREFIX = "loss", "lr", "eval/"
RAW_COLOUR, LINE_COLOUR = "#aabee1", "#14286e"  # light blue: the raw loss; dark blue: every other line
SMOOTH_HALF_WIDTH = 2  # the smoothed loss averages each logged point with up to 2 neighbours on each side
PANEL_HEIGHT = 300  # pixels per row of panels


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file, one merged dict per step in increasing step order.

  Lines that are not JSON objects with a "step" (a truncated last line, a line two writers garbled) are
  skipped. Rows of the same step merge, later keys overriding earlier ones (an eval row joins the training
  row of its step). A step lower than one already seen marks a resumed run: the rows it repeats, from that step
  on, are dropped, so each step keeps what the last run wrote. Raises ValueError naming the path when the file
  is missing or holds no rows.
  """
  if not epath.Path(path).is_file():
    raise ValueError(f"no metrics file at {path}")
  by_step: dict[int, dict] = {}
  highest = -math.inf  # the highest step kept
  for line in storage.read_lines(path):
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, KeyError, TypeError):
      continue
    if step < highest:
      by_step = {s: r for s, r in by_step.items() if s < step}
    by_step.setdefault(step, {}).update(row, step=step)
    highest = step
  if not by_step:
    raise ValueError(f"no metrics rows in {path} (empty or unreadable)")
  return [by_step[s] for s in sorted(by_step)]


def smooth(values: Sequence[float], half_width: int = SMOOTH_HALF_WIDTH) -> np.ndarray:
  """Centred moving mean: point i averages the finite values within min(half_width, i, n - 1 - i) of it.

  The window stays symmetric up to the ends, so a steadily falling (or rising)
  curve is not shifted as a trailing average would shift it; NaN points stay
  NaN and are left out of their neighbours' means.
  """
  v = np.asarray(values, np.float64)
  out = np.full(v.shape, np.nan)
  n = len(v)
  for i in range(n):
    if not np.isfinite(v[i]):
      continue
    h = min(half_width, i, n - 1 - i)
    window = v[i - h:i + h + 1]
    out[i] = window[np.isfinite(window)].mean()
  return out


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that hold `key` as a number; non-finite values are kept as NaN."""
  pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
  steps = np.array([p[0] for p in pairs], np.float64)
  values = np.array([p[1] for p in pairs], np.float64)
  values[~np.isfinite(values)] = np.nan
  return steps, values


def panels(rows: Sequence[dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(key, steps, values) of each panel to draw: loss, learning rate, then each eval metric, when finite."""
  keys = [LOSS_KEY, LR_KEY] + sorted({k for r in rows for k in r if k.startswith(EVAL_PREFIX)})
  found = [(key, *_series(rows, key)) for key in keys]
  found = [(key, s, v) for key, s, v in found if s.size and np.isfinite(v).any()]
  if not found:
    raise ValueError("the metrics hold no finite loss, lr or eval/ values to plot")
  return found


def _log_scale(values: np.ndarray) -> bool:
  """Whether a loss axis should be logarithmic: positive values spanning more than a factor of ten."""
  finite = values[np.isfinite(values)]
  return bool(finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() > 10)


def plot_training_curves(metrics: Union[str, Sequence[dict]], out_png: str, *, width: int = 960,
                         height: int | None = None) -> "matplotlib.figure.Figure":
  """Draws loss, learning rate and eval metrics against the step into a width x height PNG; returns the figure.

  `metrics` is a metrics.jsonl path (read with read_metrics) or its rows. One
  panel per series, two per row (one when there is a single panel); height
  None: PANEL_HEIGHT pixels per row. The loss panel shows the logged points
  (each already a mean over its logging interval) light and their centred
  mean (`smooth`) dark, on a log axis when they span more than a factor of ten.
  """
  # pylint: disable=g-import-not-at-top  # matplotlib only when a plot is drawn: not in every process's start-up
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
  if not rows:
    raise ValueError("no metrics rows to plot")
  found = panels(rows)
  cols = 1 if len(found) == 1 else 2
  n_rows = math.ceil(len(found) / cols)
  height = height or PANEL_HEIGHT * n_rows
  fig = Figure(figsize=(width / 100, height / 100), dpi=100)
  FigureCanvasAgg(fig)
  for i, (key, steps, values) in enumerate(found):
    ax = fig.add_subplot(n_rows, cols, i + 1)
    if key == LOSS_KEY:
      ax.plot(steps, values, color=RAW_COLOUR, lw=1, label="logged (interval means)")
      ax.plot(steps, smooth(values), color=LINE_COLOUR, lw=2, label=f"centred mean of {2 * SMOOTH_HALF_WIDTH + 1}")
      if _log_scale(values):
        ax.set_yscale("log")
      ax.legend(loc="upper right", fontsize=8)
    else:
      ax.plot(steps, values, color=LINE_COLOUR, lw=2, marker="o" if key.startswith(EVAL_PREFIX) else None,
              markersize=4)
    ax.set_title({LOSS_KEY: "loss", LR_KEY: "learning rate"}.get(key, key), fontsize=11)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e8e8e8")
  fig.tight_layout()
  epath.Path(out_png).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(out_png).open("wb") as f:
    fig.savefig(f, dpi=100, format="png")
  return fig
