"""The variational bound on the negative log-likelihood of 8-bit images (Ho et al. 2020, eq. 5), in bits per dimension.

-log p(x0) <= L_T + sum_{t>=1} L_{t-1} + L_0, with L_T = KL(q(x_T | x0) || N(0, I))
(`prior_bits`), L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) and L_0 the
discretized Gaussian decoder's -log p(x0 | x_1) (`vb_terms`). Each is averaged
over the dimensions and divided by ln 2. `bits_per_dim` estimates the sum with
one x_t per timestep and image; `vb_terms` is also the hybrid loss's VLB term.
`make_bound_evaluator` runs the bound over a set of images in batches;
`summarize` and `report` give its mean ± standard error and its parts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, parallel
from ddpm_jax.schedule import Schedule

LN2 = float(np.log(2.0))
BIN = 1.0 / 255.0  # half the width of one of the 256 bins that tile [-1, 1]


def normal_kl(mean1: jnp.ndarray, log_var1: jnp.ndarray, mean2: jnp.ndarray, log_var2: jnp.ndarray) -> jnp.ndarray:
  """Elementwise KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats."""
  return 0.5 * (log_var2 - log_var1 - 1.0 + jnp.exp(log_var1 - log_var2)
                + jnp.square(mean1 - mean2) * jnp.exp(-log_var2))


def _log_normal_mass(lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
  """log(Φ(hi) - Φ(lo)) for lo < hi, from the tail nearer to the interval (no cancellation of two CDFs near 1)."""
  upper = lo + hi > 0  # mirror to the lower tail: Φ(hi) - Φ(lo) = Φ(-lo) - Φ(-hi)
  a, b = jnp.where(upper, -hi, lo), jnp.where(upper, -lo, hi)
  log_b = jax.scipy.special.log_ndtr(b)
  return log_b + jnp.log1p(-jnp.exp(jax.scipy.special.log_ndtr(a) - log_b))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, mean: jnp.ndarray, log_var: jnp.ndarray) -> jnp.ndarray:
  """Elementwise log-probability in nats of the 8-bit bin holding x under N(mean, e^log_var) (the paper's eq. 13).

  x lies on the grid k / 127.5 - 1 (k = 0..255); its bin is [x - 1/255,
  x + 1/255], except that the edge bins are open: (-inf, -1 + 1/255] and
  [1 - 1/255, inf).
  """
  inv_std = jnp.exp(-0.5 * log_var)
  lo = jnp.where(x < -0.999, -jnp.inf, (x - mean - BIN) * inv_std)
  hi = jnp.where(x > 0.999, jnp.inf, (x - mean + BIN) * inv_std)
  return _log_normal_mass(lo, hi)


def _mean_bits(nats: jnp.ndarray) -> jnp.ndarray:
  """[B, ...] nats -> [B] bits per dimension."""
  return jnp.mean(nats.reshape(nats.shape[0], -1), axis=1) / LN2


def prior_bits(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
  """[B] bits per dimension of L_T = KL(q(x_T | x0) || N(0, I)), T the last timestep."""
  t = jnp.full(x0.shape[:1], schedule.num_timesteps - 1, jnp.int32)
  mean = diffusion.extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
  log_var = jnp.log(diffusion.extract(jnp.square(schedule.sqrt_one_minus_alphas_cumprod), t, x0))
  return _mean_bits(normal_kl(mean, jnp.broadcast_to(log_var, x0.shape), 0.0, 0.0))


def vb_terms(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, output: jnp.ndarray, *,
             variance: str, prediction: str, clip_x0: bool = True) -> jnp.ndarray:
  """[B] bits per dimension of the bound's term at each example's timestep t, for a model `output` at x_t.

  At t = 0 the decoder's -log p(x0 | x_1) (x_t is then x_1, 0-based);
  elsewhere KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)). p's mean is the
  posterior mean at the x̂0 the output implies (clipped to [-1, 1] with
  `clip_x0`), its variance that of `variance` (diffusion.VARIANCES; an output
  with twice x's channels carries v for "learned_range").
  """
  pred, v = diffusion.split_variance(output, x_t)
  x0_hat, _ = diffusion.split_prediction(schedule, x_t, t, pred, prediction)
  if clip_x0:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  model_mean, _, _ = diffusion.q_posterior_mean_variance(schedule, x0_hat, x_t, t)
  model_log_var = diffusion.model_log_variance(schedule, t, x_t, variance, v)
  true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(schedule, x0, x_t, t)
  kl = _mean_bits(normal_kl(true_mean, jnp.broadcast_to(true_log_var, x_t.shape), model_mean, model_log_var))
  decoder = -_mean_bits(discretized_gaussian_log_likelihood(x0, model_mean, model_log_var))
  return jnp.where(t == 0, decoder, kl)


def bits_per_dim(model_fn: Callable[..., jnp.ndarray], schedule: Schedule, x0: jnp.ndarray, key: jax.Array, *,
                 variance: str = "fixed_large", prediction: str = "eps", labels: Optional[jnp.ndarray] = None,
                 clip_x0: bool = True, index_offset: jnp.ndarray | int = 0) -> dict[str, jnp.ndarray]:
  """The variational bound on -log2 p(x0) per dimension: {"total": [B], "prior": [B], "terms": [B, T]}.

  x0 must be images quantised to 8 bits and scaled to [-1, 1] (k / 127.5 - 1):
  the decoder gives each of the 256 values a bin, so the bound of any other
  data is meaningless. `model_fn(x_t, t)` (with `labels`, `model_fn(x_t, t,
  labels)`) is the network at int32 timesteps [B]: its output predicts
  `prediction` (ε, v or x0) and, for variance="learned_range", carries v in
  twice x's channels. terms[:, 0] is the decoder's NLL, terms[:, t] for t >= 1
  the KL at step t; each is estimated with one x_t ~ q(x_t | x0) per image,
  whose noise comes from (key, t, index_offset + the image's index in x0). One
  lax.map over the T timesteps; jit-able.
  """
  b = x0.shape[0]
  x0 = x0.astype(jnp.float32)
  image_keys = diffusion.example_keys(key, b, index_offset)
  call = model_fn if labels is None else lambda x, t: model_fn(x, t, labels)

  def term(t: jnp.ndarray) -> jnp.ndarray:
    tb = jnp.full((b,), t, jnp.int32)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x0.shape[1:]))(image_keys)
    x_t = diffusion.q_sample(schedule, x0, tb, noise)
    return vb_terms(schedule, x0, x_t, tb, call(x_t, tb), variance=variance, prediction=prediction,
                    clip_x0=clip_x0)

  terms = jax.lax.map(term, jnp.arange(schedule.num_timesteps, dtype=jnp.int32)).T
  prior = prior_bits(schedule, x0)
  return {"total": jnp.sum(terms, axis=1) + prior, "prior": prior, "terms": terms}


def make_bound_evaluator(model_fn: Callable[..., jnp.ndarray], schedule: Schedule, *, variance: str,
                         prediction: str = "eps", batch_size: int = 256, clip_x0: bool = True,
                         devices: Optional[Sequence[jax.Device]] = None) -> Callable[..., dict[str, np.ndarray]]:
  """A function (params, images, key, labels=None, progress=None) -> `bits_per_dim`'s dict over every image, as
  NumPy arrays.

  `model_fn(params, x_t, t)` (`model_fn(params, x_t, t, labels)` with labels)
  is the network; `images` are 8-bit images in [-1, 1], evaluated in batches
  of `batch_size` rounded up to a multiple of the device count (the last one
  padded), each split over `devices` (default: this process's devices; only
  this process calls it). The bound is compiled once per kind of key (with or
  without labels). Image i's noise comes from (key, i) alone, so its bound
  depends neither on the batch size nor on the devices. `progress(done,
  total)` is called after each batch. Its `program` attribute maps (key impl,
  labelled) to the jitted bound it calls, taking (params, key data, offsets,
  x0[, labels]); `batch_size` is the images per call.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1")
  devices = list(devices or jax.local_devices())
  per_device = -(-batch_size // len(devices))
  per_call = per_device * len(devices)
  _, rows, replicated = parallel.mesh_layout(devices, sharded=False)

  def shard(params, key, offset, x0, labels):
    return bits_per_dim(functools.partial(model_fn, params), schedule, x0, key, variance=variance,
                        prediction=prediction, labels=labels, clip_x0=clip_x0, index_offset=offset)

  program = parallel.batch_programs(shard, devices, 1)

  def evaluate(params: Any, images: np.ndarray, key: jax.Array, labels: Optional[np.ndarray] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> dict[str, np.ndarray]:
    """The bound of each image (of class labels[i], when given)."""
    n = len(images)
    pad = -n % per_call
    images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]).astype(np.float32)
    if labels is not None:
      labels = np.concatenate([labels, np.repeat(labels[-1:], pad)]).astype(np.int32)
    run = program(jax.random.key_impl(key), labels is not None)
    placed = parallel.place(params, jax.tree_util.tree_map(lambda _: replicated, params))
    key_data = parallel.place(jax.random.key_data(key), replicated)
    parts = []
    for start in range(0, n, per_call):
      offsets = start + per_device * np.arange(len(devices), dtype=np.int32)
      batch = [offsets, images[start:start + per_call]] + ([] if labels is None else [labels[start:start + per_call]])
      part = run(placed, key_data, *(parallel.place(a, rows) for a in batch))
      parts.append(jax.device_get(part))
      if progress is not None:
        progress(min(start + per_call, n), n)
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}

  evaluate.program = program  # (key impl, labelled) -> the jitted sharded bound it calls, for lowering and export
  evaluate.batch_size = per_call
  return evaluate


def summarize(result: dict[str, np.ndarray]) -> dict[str, Any]:
  """The bound's mean over images with its standard error, and the means of its parts (prior, decoder, KL terms,
  and each term)."""
  total, terms = np.asarray(result["total"], np.float64), np.asarray(result["terms"], np.float64)
  n = len(total)
  return {"bits_per_dim": float(total.mean()),
          "standard_error": float(total.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
          "prior": float(np.mean(result["prior"])), "decoder": float(terms[:, 0].mean()),
          "kl_terms": float(terms[:, 1:].sum(axis=1).mean()), "num_images": n,
          "terms": terms.mean(axis=0).tolist()}


def report(summary: dict[str, Any], note: str = "") -> str:
  """One line: 'bits/dim: X ± SE over N images (prior, decoder, KL terms[; note])'."""
  s = summary
  return (f"bits/dim: {s['bits_per_dim']:.4f} ± {s['standard_error']:.4f} over {s['num_images']} images (prior "
          f"{s['prior']:.4f} + decoder {s['decoder']:.4f} + KL terms {s['kl_terms']:.4f}{'; ' + note if note else ''})")
