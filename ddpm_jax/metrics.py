"""Sample-quality statistics on feature vectors: Fréchet distance, KID and the Inception score."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of [N, D] features, in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with those under its rounding level (d·ε·max) set to 0, as the null space's are.

  Their square roots would otherwise add d·sqrt(ε·max) of noise to a rank-deficient covariance's trace term.
  """
  return np.where(w > len(w) * np.finfo(w.dtype).eps * max(w.max(), 0), w, 0)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric positive semi-definite matrix."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), via symmetric eigendecompositions (no complex sqrtm)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances {s1.shape} and {s2.shape}")
  r1 = _sqrt_psd(s1)
  cross = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh(r1 @ s2 @ r1))).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def frechet_distance_of(features1: np.ndarray, features2: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets."""
  return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 10,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """(mean, std) over random subsets of the unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³."""
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError(f"KID needs at least 2 features per set, got {len(f1)} and {len(f2)}")
  d = f1.shape[1]
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    vals.append(off(kxx) + off(kyy) - 2 * kxy.mean())
  return float(np.mean(vals)), float(np.std(vals))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over min(splits, N) splits of exp(E_x KL(p(y|x) ‖ p(y))) from class logits [N, K]."""
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or len(z) < 1:
    raise ValueError(f"logits must be [N, K] with N >= 1, got shape {z.shape}")
  logp = z - z.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(logp, min(splits, len(logp))):
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def extract(extractor: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], batches: Iterable[np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray]:
  """Concatenated (features, logits) of a feature extractor over batches of images."""
  feats, logits = zip(*(tuple(map(np.asarray, extractor(b))) for b in batches))
  return np.concatenate(feats), np.concatenate(logits)
