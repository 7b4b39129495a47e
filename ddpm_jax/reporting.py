"""Metric writing (metrics.jsonl and TensorBoard) and progress lines on the console."""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Callable

import numpy as np


def format_eta(seconds: float) -> str:
  """Seconds as h:mm:ss."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_printer(what: str, every: int = 1) -> Callable[[int, int], None]:
  """A callback (done, total) printing progress, items/s and ETA on every `every`-th call and the last.

  The rate is measured from the first call on, once there is a second: the
  first call's interval holds the compilation. Until then it is measured from
  the printer's creation (an upper bound on the ETA); with nothing done yet
  the ETA is unknown.
  """
  start, calls, first = time.time(), itertools.count(), []

  def report(done: int, total: int) -> None:
    now = time.time()
    if not first:
      first.append((now, done))
    t0, done0 = first[0]
    if next(calls) % every == 0 or done >= total:
      rate = (done - done0) / max(now - t0, 1e-9) if done > done0 else done / max(now - start, 1e-9)
      eta = format_eta((total - done) / rate) if rate > 0 else "unknown"
      print(f"{what} {done}/{total} | {rate:.1f}/s | ETA {eta}", flush=True)
  return report


class MetricWriter:
  """Appends scalars to workdir/metrics.jsonl and scalars and images to TensorBoard event files."""

  def __init__(self, workdir: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy; only the training process needs it

    self._tf = tf
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Records scalars at step."""
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    with self._tb.as_default():
      for k, v in scalars.items():
        self._tf.summary.scalar(k, v, step=step)
    self._tb.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Records one uint8 HWC image (1 or 3 channels) at step."""
    with self._tb.as_default():
      self._tf.summary.image(name, np.asarray(image, np.uint8)[None], step=step)
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both files."""
    self._jsonl.close()
    self._tb.close()
