"""Training curves from metrics.jsonl, drawn with Pillow only: loss (raw and smoothed), learning rate, eval metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from ddpm_jax.images import Box, load_font

LOSS_KEY, LR_KEY, EVAL_PREFIX = "loss", "lr", "eval/"
RAW_COLOUR = (170, 190, 225)  # light blue: the raw loss, 1 pixel wide
LINE_COLOUR = (20, 40, 110)  # dark blue: smoothed loss, learning rate and eval metrics, 2 pixels wide
GRID_COLOUR = (232, 232, 232)
AXIS_COLOUR = (0, 0, 0)
BACKGROUND = (255, 255, 255)
# Pixels around each panel's plot area: room for the title above, tick labels left and below.
PLOT_INSET = dict(left=64, top=28, right=26, bottom=36)


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file, one merged dict per step in increasing step order.

  Lines that are not JSON objects with a "step" (a truncated last line, a line two writers garbled) are
  skipped. Rows of the same step merge, later keys overriding earlier ones (an eval row joins the training
  row of its step). A step lower than one already seen marks a resumed run: the rows it repeats, from that step
  on, are dropped, so each step keeps what the last run wrote. Raises ValueError naming the path when the file
  is missing or holds no rows.
  """
  if not os.path.isfile(path):
    raise ValueError(f"no metrics file at {path}")
  by_step: dict[int, dict] = {}
  highest = -math.inf  # the highest step kept
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
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


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
  """Debiased exponential moving average (TensorBoard's): NaN/Inf inputs stay NaN and do not enter the average."""
  out = np.full(len(values), np.nan)
  last, count = 0.0, 0
  for i, v in enumerate(values):
    if not np.isfinite(v):
      continue
    last, count = weight * last + (1 - weight) * v, count + 1
    out[i] = last / (1 - weight ** count)
  return out


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that hold `key` as a number; non-finite values are kept as NaN."""
  pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
  steps = np.array([p[0] for p in pairs], np.float64)
  values = np.array([p[1] for p in pairs], np.float64)
  values[~np.isfinite(values)] = np.nan
  return steps, values


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
  """About `target` round numbers (1, 2 or 5 times a power of ten apart) within [lo, hi]."""
  if not hi > lo:
    return [lo]
  mag = 10 ** math.floor(math.log10((hi - lo) / max(1, target - 1)))
  spans = [(math.ceil(lo / (m * mag) - 1e-9), math.floor(hi / (m * mag) + 1e-9), m * mag) for m in (1, 2, 5, 10)]
  first, last, step = min(spans, key=lambda f: (abs(f[1] - f[0] + 1 - target), -f[2]))
  return [round(k * step, 12) for k in range(first, last + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
  """Powers of ten within [lo, hi] (0 < lo < hi), with their 2x and 5x multiples when fewer than three powers fit."""
  powers = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
  ticks = [10.0 ** p for p in powers if lo <= 10.0 ** p <= hi]
  if len(ticks) < 3:
    ticks = sorted(m * 10.0 ** p for p in powers for m in (1, 2, 5) if lo <= m * 10.0 ** p <= hi)
  return ticks


def format_number(v: float) -> str:
  """A short tick label: 0, 250, 12000, 150k, 2.5M, 0.03, 2e-05."""
  if v == 0:
    return "0"
  a = abs(v)
  if a >= 1e6:
    return f"{v / 1e6:g}M"
  if a >= 1e5:
    return f"{v / 1e3:g}k"
  if a >= 1 and float(v).is_integer():
    return str(int(v))
  return f"{v:.3g}" if a >= 1e-3 else f"{v:.2g}"


@dataclasses.dataclass(frozen=True)
class Panel:
  """One plot of the figure: `box` is its plot area (x0, y0, x1, y1), end-exclusive; data map into it linearly.

  Step x_lo maps to pixel column x0 and x_hi to x1 - 1; value y_lo maps to pixel row y1 - 1 and y_hi to y0
  (log10 of them when log_y).
  """

  title: str
  keys: tuple[str, ...]
  box: Box
  x_lo: float
  x_hi: float
  y_lo: float
  y_hi: float
  log_y: bool

  def to_pixel(self, step: float, value: float) -> tuple[float, float]:
    """The (x, y) pixel position of a data point."""
    x0, y0, x1, y1 = self.box
    f = (lambda v: math.log10(v)) if self.log_y else (lambda v: v)
    x = x0 + (step - self.x_lo) / (self.x_hi - self.x_lo) * (x1 - 1 - x0)
    y = y1 - 1 - (f(value) - f(self.y_lo)) / (f(self.y_hi) - f(self.y_lo)) * (y1 - 1 - y0)
    return x, y


def _value_range(values: np.ndarray, log_y: bool) -> tuple[float, float]:
  """The y range of finite values with 5% headroom (a decade-fraction on log axes); widened when constant."""
  finite = values[np.isfinite(values)]
  if log_y:
    finite = np.log10(finite[finite > 0])
  if finite.size == 0:
    return (0.1, 10.0) if log_y else (0.0, 1.0)
  lo, hi = float(finite.min()), float(finite.max())
  if hi - lo < 1e-12 * max(1.0, abs(hi)):
    half = 0.05 if log_y else (abs(lo) * 0.1 or 1.0)
    lo, hi = lo - half, hi + half
  else:
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
  return (10 ** lo, 10 ** hi) if log_y else (lo, hi)


def _panels(rows: Sequence[dict], width: int, height: int) -> list[tuple[Panel, dict[str, np.ndarray]]]:
  """Lays out the panels (loss, learning rate, then each eval metric), two per row when more than one."""
  keys = sorted({k for r in rows for k in r if k.startswith(EVAL_PREFIX)})
  wanted = [("loss (light: raw, dark: smoothed)", LOSS_KEY), ("learning rate", LR_KEY)] + [(k, k) for k in keys]
  found = [(title, key, _series(rows, key)) for title, key in wanted]
  found = [(title, key, s) for title, key, s in found if s[0].size and np.isfinite(s[1]).any()]
  if not found:
    raise ValueError("the metrics hold no finite loss, lr or eval/ values to plot")
  cols = 1 if len(found) == 1 else 2
  n_rows = math.ceil(len(found) / cols)
  steps = np.array([r["step"] for r in rows], np.float64)
  x_lo, x_hi = float(steps.min()), float(steps.max())
  if x_hi == x_lo:
    x_lo, x_hi = x_lo - 1, x_hi + 1
  out = []
  for i, (title, key, (s, v)) in enumerate(found):
    r, c = divmod(i, cols)
    left, top = c * width // cols, r * height // n_rows
    right, bottom = (c + 1) * width // cols, (r + 1) * height // n_rows
    box = (left + PLOT_INSET["left"], top + PLOT_INSET["top"], right - PLOT_INSET["right"],
           bottom - PLOT_INSET["bottom"])
    finite = v[np.isfinite(v)]
    log_y = bool(key == LOSS_KEY and finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() > 10)
    y_lo, y_hi = _value_range(v, log_y)
    series = {key: v, "steps": s}
    if key == LOSS_KEY:
      series["smoothed"] = smooth(v)
    out.append((Panel(title, (key,), box, x_lo, x_hi, y_lo, y_hi, log_y), series))
  return out


def _polyline(draw, panel: Panel, steps: np.ndarray, values: np.ndarray, colour, width: int,
              dots: bool = False) -> None:
  """Joins the finite (on log axes: positive) points in step order; dots a lone point, or every point if dots."""
  keep = np.isfinite(values) & ((values > 0) if panel.log_y else True)
  points = [panel.to_pixel(s, v) for s, v in zip(steps[keep], values[keep])]
  if len(points) == 1 or (points and len(set((round(x), round(y)) for x, y in points)) == 1):
    x, y = points[0]
    draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
  elif points:
    draw.line(points, fill=colour, width=width, joint="curve" if width > 1 else None)
    for x, y in points if dots else ():
      draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)


def _draw_panel(draw, fonts, panel: Panel, series: dict[str, np.ndarray]) -> None:
  """Draws one panel: grid lines, axes, tick labels, title, the data lines."""
  small, big = fonts
  x0, y0, x1, y1 = panel.box
  xt = nice_ticks(panel.x_lo, panel.x_hi, 5)
  yt = log_ticks(panel.y_lo, panel.y_hi) if panel.log_y else nice_ticks(panel.y_lo, panel.y_hi, 5)
  for t in xt:
    x, _ = panel.to_pixel(t, panel.y_hi)
    draw.line([(x, y0), (x, y1 - 1)], fill=GRID_COLOUR)
    draw.line([(x, y1), (x, y1 + 4)], fill=AXIS_COLOUR)
    label = format_number(t)
    draw.text((x - small.getlength(label) / 2, y1 + 6), label, fill=AXIS_COLOUR, font=small)
  for t in yt:
    _, y = panel.to_pixel(panel.x_lo, t)
    draw.line([(x0, y), (x1 - 1, y)], fill=GRID_COLOUR)
    draw.line([(x0 - 5, y), (x0 - 1, y)], fill=AXIS_COLOUR)
    label = format_number(t)
    draw.text((x0 - 7 - small.getlength(label), y - 8), label, fill=AXIS_COLOUR, font=small)
  draw.line([(x0 - 1, y0), (x0 - 1, y1), (x1 - 1, y1)], fill=AXIS_COLOUR)
  title = panel.title + (", log scale" if panel.log_y else "")
  draw.text((x0, y0 - 22), title, fill=AXIS_COLOUR, font=big)
  draw.text((x1 - small.getlength("step"), y1 + 20), "step", fill=AXIS_COLOUR, font=small)
  key = panel.keys[0]
  if key == LOSS_KEY:
    _polyline(draw, panel, series["steps"], series[key], RAW_COLOUR, 1)
    _polyline(draw, panel, series["steps"], series["smoothed"], LINE_COLOUR, 2)
  else:
    _polyline(draw, panel, series["steps"], series[key], LINE_COLOUR, 2, dots=key.startswith(EVAL_PREFIX))


def plot_training_curves(metrics: Union[str, Sequence[dict]], out_png: str, *, width: int = 960,
                         height: Optional[int] = None) -> list[Panel]:
  """Draws loss, learning rate and eval metrics against the step into a width x height PNG; returns its panels.

  `metrics` is a metrics.jsonl path (read with read_metrics) or its rows. Panels fill a grid of two columns
  (one when there is a single panel) of equal cells; height None: 300 pixels per panel row. Each panel's
  to_pixel maps data to pixels; the smoothed loss is smooth(loss values in step order). The loss axis is
  logarithmic when the finite losses are positive and span more than a factor of ten. Non-finite values are
  not drawn; a series with one point is drawn as a dot.
  """
  rows = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
  if not rows:
    raise ValueError("no metrics rows to plot")
  if height is None:
    n = len(_panels(rows, width, 600))
    height = 300 * math.ceil(n / (1 if n == 1 else 2))
  laid_out = _panels(rows, width, height)
  for panel, _ in laid_out:
    if panel.box[2] - panel.box[0] < 20 or panel.box[3] - panel.box[1] < 20:
      raise ValueError(f"{width}x{height} pixels are too small for {len(laid_out)} panels")
  image = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(image)
  fonts = (load_font(12), load_font(14))
  for panel, series in laid_out:
    _draw_panel(draw, fonts, panel, series)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  image.save(out_png)
  return [panel for panel, _ in laid_out]
