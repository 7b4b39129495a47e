"""The training loop's hooks: a grid of EMA samples, sample scores and the likelihood bound, each at its interval."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from ddpm_jax import evaluation, images, likelihood
from ddpm_jax.evaluation import Evaluator
from ddpm_jax.reporting import MetricWriter


def nll_hook(bound: Callable, images_: Optional[np.ndarray], labels: Optional[np.ndarray], key: jax.Array,
             which: str) -> Callable:
  """A loop hook computing the likelihood bound of the EMA params (process 0 alone) and logging it as
  eval/bits_per_dim with its standard error and parts."""

  def run(step: int, ema_params: Any, writer: Optional[MetricWriter]) -> None:
    if writer is None:
      return
    s = likelihood.summarize(bound(ema_params, images_, key, labels))
    writer.write(step, {"eval/bits_per_dim": s["bits_per_dim"], "eval/bits_per_dim_se": s["standard_error"],
                        "eval/bits_per_dim_prior": s["prior"], "eval/bits_per_dim_decoder": s["decoder"],
                        "eval/bits_per_dim_kl": s["kl_terms"]})
    print(f"nll at step {step}: {likelihood.report(s, which)}", flush=True)
  return run


def sample_grid_hook(workdir: str, generate: Callable, key: jax.Array, num_samples: int,
                     num_classes: int) -> Callable:
  """A loop hook writing a grid of EMA samples (of a conditional model: one class per row) to
  workdir/samples/step_N.png and TensorBoard."""
  labels, cols = images.class_rows(range(num_classes), num_samples) if num_classes else (None, None)

  def run(step: int, ema_params: Any, writer: Optional[MetricWriter]) -> None:
    samples = generate(ema_params, key, num_samples, labels=labels)  # every process takes part
    if writer is None:
      return
    grid = images.make_grid(images.to_uint8(samples), cols, scale=None)
    images.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)
    writer.write_image(step, "samples", grid)
  return run


def eval_hook(generate: Callable, evaluate: Optional[Evaluator], key: jax.Array, num_samples: int,
              num_classes: int) -> Callable:
  """A loop hook scoring EMA samples (of a conditional model: every class in turn) and logging the numbers as
  eval/*."""
  labels = np.arange(num_samples, dtype=np.int32) % num_classes if num_classes else None

  def run(step: int, ema_params: Any, writer: Optional[MetricWriter]) -> None:
    samples = generate(ema_params, key, num_samples, labels=labels)  # every process takes part; process 0 scores
    if evaluate is None or writer is None:
      return
    result = evaluate(samples, labels)
    writer.write(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
    print(f"eval at step {step}: {evaluation.report(result)}", flush=True)
  return run
