"""Metric writing (metrics.jsonl, TensorBoard through tensorboardX, optionally Weights & Biases) and progress lines."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import time
import uuid
from typing import Callable, Optional

import numpy as np
from etils import epath

from ddpm_jax import storage


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


def drop_rows_after(path: str, step: int) -> None:
  """Rewrites a metrics.jsonl without the rows of steps after `step` (a resumed run writes them again)."""
  if not epath.Path(path).is_file():
    return
  lines = storage.read_lines(path)
  kept = [line for line in lines if _row_step(line) <= step]
  if len(kept) == len(lines):
    return
  storage.write_atomic(path, "".join(kept))


def _row_step(line: str) -> float:
  """The step of a metrics.jsonl line; unreadable lines (a torn last line) count as after every step."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")


def check_wandb(project: Optional[str]) -> None:
  """Raises ValueError when Weights & Biases logging is asked for and the package is missing."""
  if project and importlib.util.find_spec("wandb") is None:
    raise ValueError(f"wandb.project={project!r} needs the wandb package, which is not installed: "
                     "pip install wandb (or leave wandb.project unset)")


class _AppendedEventFiles:
  """tensorboardX's writer factory for gs:// paths: event files that grow through storage.appender (each byte
  uploaded once), where tensorboardX's own uploads the whole file again at every flush."""

  def open(self, path: str):
    """A handle appending to the event file at path."""
    return storage.appender(path)

  def directory_check(self, path: str) -> None:
    """Nothing to do: a bucket has no folders to make."""


class MetricWriter:
  """Appends scalars to workdir/metrics.jsonl, scalars and images to TensorBoard event files (tensorboardX), and to
  Weights & Biases when a project is named. In a bucket the first two grow through storage.appender: uploaded at
  most every storage.UPLOAD_EVERY_S (and on flush and close), each byte once.

  A writer opened at `start_step` (a resumed run) first drops the rows the
  interrupted run logged after it, from metrics.jsonl and, through TensorBoard's
  purge step, from the event files' view, so that no step is shown twice.
  """

  def __init__(self, workdir: str, start_step: int = 0, wandb_project: Optional[str] = None,
               config: Optional[dict] = None):
    from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top  # training only

    if storage.is_remote(workdir):  # tensorboardX's writers, by scheme: its gs:// one replaced for this process
      record_writer.register_writer_factory("gs", _AppendedEventFiles())
    self._metrics = os.path.join(workdir, "metrics.jsonl")
    drop_rows_after(self._metrics, start_step)
    self._jsonl = storage.appender(self._metrics)
    # A suffix of its own: event files are named by the second, and a run restarted within it would overwrite one.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1,
                             filename_suffix=f".from{start_step}.pid{os.getpid()}")
    self._wandb = None
    if wandb_project:
      check_wandb(wandb_project)
      import wandb  # pylint: disable=g-import-not-at-top  # optional

      self._wandb = wandb.init(project=wandb_project, dir=None if storage.is_remote(workdir) else workdir,
                               config=config, resume="allow", id=_run_id(workdir))  # W&B's own files: local only

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Records scalars at step."""
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._wandb:
      self._wandb.log(scalars, step=step)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Records one uint8 HWC image (1 or 3 channels) at step."""
    image = np.asarray(image, np.uint8)
    self._tb.add_image(name, np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image, step,
                       dataformats="HWC")
    self._tb.flush()
    if self._wandb:
      import wandb  # pylint: disable=g-import-not-at-top  # optional

      self._wandb.log({name: wandb.Image(image)}, step=step)

  def flush(self) -> None:
    """Makes every row written so far readable in metrics.jsonl, in a bucket too."""
    self._jsonl.close()
    self._jsonl = storage.appender(self._metrics)

  def close(self) -> None:
    """Flushes and closes every output."""
    self._jsonl.close()
    self._tb.close()
    if self._wandb:
      self._wandb.finish()


def _run_id(workdir: str) -> str:
  """The workdir's Weights & Biases run id, made at its first start and kept in WORKDIR/wandb_run_id, so that a
  resumed run continues the same W&B run and a new run in a recreated workdir starts a new one."""
  path = epath.Path(workdir, "wandb_run_id")
  if not path.is_file():
    storage.write_atomic(str(path), uuid.uuid4().hex[:16])
  return path.read_text(encoding="utf-8").strip()
