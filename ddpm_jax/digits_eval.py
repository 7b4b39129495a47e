"""An offline evaluator for samples of the embedded 8x8 digits, needing no downloaded weights.

A small classifier trained on the real digits (with outlier exposure: noise and
pixel-shuffled digits are taught to get a uniform prediction, so confidence
means "looks like a digit") scores N samples by the fraction classified with
confidence >= 0.9, the class histogram's distance from uniform, and the
Fréchet distance in the classifier's feature space against real digits, beside
the real-vs-real floor of two disjoint halves of the data.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from ddpm_jax import metrics, storage
from ddpm_jax.data import LUMA, load_digits

CONFIDENCE = 0.9
HELD_OUT = 300


class DigitsClassifier(nn.Module):
  """An MLP on 8x8 images: 64 -> 256 -> 64 features -> 10 logits."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    h = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    features = nn.relu(nn.Dense(64)(h))
    return features, nn.Dense(10)(features)


def real_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All digits as float32 [N, 8, 8, 1] in [-1, 1], their labels, and a seeded permutation of their indices."""
  images, labels = load_digits()
  return (images / 127.5 - 1).astype(np.float32), labels, np.random.default_rng(seed).permutation(len(labels))


def _outliers(key: jax.Array, digits: jnp.ndarray) -> jnp.ndarray:
  """Non-digits of the digits' shape: uniform noise, and digits with their pixels shuffled."""
  k1, k2 = jax.random.split(key)
  noise = jax.random.uniform(k1, digits.shape, minval=-1, maxval=1)
  flat = digits.reshape(digits.shape[0], -1)
  shuffled = jax.vmap(jax.random.permutation)(jax.random.split(k2, flat.shape[0]), flat).reshape(digits.shape)
  return jnp.concatenate([noise, shuffled])


def train_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0, steps: int = 1500) -> Any:
  """Classifier params fitted to (images, labels) with outlier exposure; a pure function of its inputs and seed."""
  model = DigitsClassifier()
  key = jax.random.key(seed)
  params = model.init(key, jnp.zeros((1, 8, 8, 1)))
  tx = optax.adam(1e-3)
  x, y = jnp.asarray(images), jnp.asarray(labels)

  def loss(params, key):
    idx = jax.random.choice(key, x.shape[0], (256,))
    batch = x[idx]
    _, logits = model.apply(params, batch)
    _, out_logits = model.apply(params, _outliers(jax.random.fold_in(key, 1), batch[:64]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
    uniform = -jax.nn.log_softmax(out_logits).mean()  # cross-entropy against the uniform distribution
    return ce + 0.5 * uniform

  @jax.jit
  def train(params):
    def step(carry, i):
      params, opt = carry
      grads = jax.grad(loss)(params, jax.random.fold_in(key, i))
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), None
    return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))[0][0]

  return train(params)


def load_or_train(workdir: str, seed: int = 0) -> Any:
  """The classifier of `seed`, trained on all but the held-out digits, cached in workdir."""
  path = os.path.join(workdir, f"digits_classifier_seed{seed}.msgpack")
  template = DigitsClassifier().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  if epath.Path(path).exists():
    return flax.serialization.from_bytes(template, epath.Path(path).read_bytes())
  images, labels, perm = real_digits(seed)
  params = train_classifier(images[perm[HELD_OUT:]], labels[perm[HELD_OUT:]], seed)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  storage.write_atomic(path, flax.serialization.to_bytes(params))
  return params


def classify(params: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(features, probabilities) of [N, H, W, 1] images in [-1, 1] (or [N, H, W, 3]: an RGB model of the digits, made
  gray as the data pipeline makes RGB gray), resized to 8x8 if needed."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 3:
    x = x @ jnp.asarray(LUMA, jnp.float32)[:, None]
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"the digits evaluator takes [N, H, W, 1] or [N, H, W, 3] images, got shape {x.shape}")
  if x.shape[1:3] != (8, 8):
    x = jax.image.resize(x, (x.shape[0], 8, 8, 1), "linear", antialias=True)
  features, logits = jax.jit(DigitsClassifier().apply)(params, x)
  return np.asarray(features), np.asarray(jax.nn.softmax(logits))


def requested(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per image, whether the judge gives its requested class probability >= CONFIDENCE."""
  return probs[np.arange(len(labels)), labels] >= CONFIDENCE


def evaluate(params: Any, samples: np.ndarray, seed: int = 0, labels: Optional[np.ndarray] = None) -> dict[str, Any]:
  """Confidence, class balance and feature-space Fréchet distance (with its real-vs-real floor) of samples; with
  the classes they were asked for (`labels`), the fraction confidently of that class, overall and per class, and
  the same for the held-out real digits."""
  images, real_labels, perm = real_digits(seed)
  half = len(perm) // 2
  real_a, _ = classify(params, images[perm[:half]])
  real_b, _ = classify(params, images[perm[half:]])
  features, probs = classify(params, samples)
  hist = np.bincount(probs.argmax(axis=1), minlength=10) / len(probs)
  asked = {}
  if labels is not None:
    labels = np.asarray(labels)
    hit = requested(probs, labels)
    _, held_probs = classify(params, images[perm[:HELD_OUT]])
    asked = {"requested_fraction": float(hit.mean()),
             "requested_fraction_by_class": [round(float(hit[labels == k].mean()), 4) if (labels == k).any()
                                             else None for k in range(10)],
             "real_requested_fraction": float(requested(held_probs, real_labels[perm[:HELD_OUT]]).mean())}
  return {**asked,
      "num_samples": int(len(samples)),
      "confident_fraction": float((probs.max(axis=1) >= CONFIDENCE).mean()),
      "class_fractions": [round(float(h), 4) for h in hist],
      "class_tv_from_uniform": float(0.5 * np.abs(hist - 0.1).sum()),
      "frechet_distance": metrics.frechet_distance_of(features, real_b),
      "frechet_floor_real_vs_real": metrics.frechet_distance_of(real_a, real_b),
  }


def report(result: dict[str, Any]) -> str:
  """One human-readable paragraph of an evaluate() result."""
  fractions = " ".join(f"{d}:{100 * f:.1f}%" for d, f in enumerate(result["class_fractions"]))
  asked = ""
  if "requested_fraction" in result:
    worst = min((f, k) for k, f in enumerate(result["requested_fraction_by_class"]) if f is not None)
    asked = (f"{100 * result['requested_fraction']:.1f}% confidently the requested class (worst class {worst[1]}: "
             f"{100 * worst[0]:.1f}%; held-out real digits: {100 * result['real_requested_fraction']:.1f}%); ")
  return (f"{result['num_samples']} samples: {asked}{100 * result['confident_fraction']:.1f}% classified with "
          f"confidence >= {CONFIDENCE}; classes {fractions} (total variation from uniform "
          f"{result['class_tv_from_uniform']:.3f}); feature Fréchet distance {result['frechet_distance']:.2f} "
          f"vs real-vs-real floor {result['frechet_floor_real_vs_real']:.2f}")
