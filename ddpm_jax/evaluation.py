"""Sample-quality evaluators: the offline digits judge and Inception FID / KID / IS with cached real statistics.

An evaluator maps float samples in [-1, 1] to a dict of numbers. Both first
quantise the samples to the 8-bit grid the real images live on, as
pytorch-fid and the DDPM evaluation do, so that a sample is scored as the PNG
it would be saved as.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ddpm_jax import digits_eval, images, inception
from ddpm_jax.reporting import progress_printer

Evaluator = Callable[..., dict[str, Any]]  # (samples, labels=None) -> numbers; labels: the classes asked for


def quantize(samples: np.ndarray) -> np.ndarray:
  """Float samples in [-1, 1] rounded to the uint8 grid and mapped back to float32 in [-1, 1]."""
  return images.to_uint8(samples).astype(np.float32) / 127.5 - 1.0


def digits_evaluator(workdir: str, seed: int) -> Evaluator:
  """The digits judge (trained on first use, cached in workdir) as an evaluator."""

  def evaluate(samples: np.ndarray, labels: Optional[np.ndarray] = None) -> dict[str, Any]:
    judge = digits_eval.load_or_train(workdir, seed)
    return {"evaluator": "digits", **digits_eval.evaluate(judge, quantize(samples), seed, labels)}
  return evaluate


def fid_stats_path(weights: str, dataset: str, split: str, image_size: int, channels: int, num_real: int) -> str:
  """Where the real images' statistics for these weights are cached: WEIGHTS_DIR/fid_stats/<name>.npz."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{dataset}_{split}").strip("_")
  return os.path.join(os.path.dirname(os.path.abspath(weights)), "fid_stats",
                      f"{slug}_{image_size}px_{channels}ch_{num_real}.npz")


def inception_evaluator(weights: str, real_batches: Callable[[], Iterator[np.ndarray]], num_real: int,
                        stats_path: str, batch_size: int = 100) -> Evaluator:
  """FID, KID and IS against the first `num_real` images of real_batches(), their statistics cached at stats_path."""
  inception.check_weights_path(weights)

  def evaluate(samples: np.ndarray, labels: Optional[np.ndarray] = None) -> dict[str, Any]:
    del labels  # FID, KID and IS score the samples as a whole
    extractor = inception.make_extractor(inception.load_variables(weights))

    def real_features() -> np.ndarray:
      print(f"computing Inception statistics of {num_real} real images into {stats_path}", flush=True)
      return inception.reference_features(extractor, real_batches(), num_real,
                                          progress_printer("real images", every=10))

    reference = inception.cached_reference(stats_path, real_features, inception.weights_fingerprint(weights))
    return {"evaluator": "inception", **inception.score(extractor, quantize(samples), reference, batch_size)}
  return evaluate


def report(result: dict[str, Any]) -> str:
  """One human-readable line of an evaluator's result."""
  return (digits_eval.report if result["evaluator"] == "digits" else inception.report)(result)
