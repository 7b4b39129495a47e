"""The forward process, its posterior, parameterisation conversions and the training loss.

Every function is pure, jit-able and broadcasts a per-example timestep `t`
(int array of shape [B], or a scalar) over the remaining axes of `x`.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from ddpm_jax.schedule import Schedule

LOSSES = ("l1", "l2")


def extract(coef: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """coef[t] reshaped to broadcast against x: [B] -> [B, 1, ..., 1]."""
  t = jnp.asarray(t)
  vals = coef[t].astype(x.dtype)
  return vals.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def q_step(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """One forward step with β_t: sqrt(1 - β_t) x + sqrt(β_t) ε."""
  beta = extract(schedule.betas, t, x_t)
  return jnp.sqrt(1.0 - beta) * x_t + jnp.sqrt(beta) * noise


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """x_t in closed form: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def predict_x0_from_eps(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
  """x0 implied by x_t and a noise estimate."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
  """Noise implied by x_t and an x0 estimate."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def get_v(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """The v-parameterisation target: sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def predict_x0_from_v(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """x0 implied by x_t and a v estimate."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def predict_eps_from_v(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """Noise implied by x_t and a v estimate."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
          + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v)


def q_posterior_mean_variance(
    schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  var = extract(schedule.posterior_variance, t, x_t)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, var, log_var


def loss_fn(
    pred: jnp.ndarray, target: jnp.ndarray, kind: str = "l1", weights: Optional[jnp.ndarray] = None
) -> jnp.ndarray:
  """Mean absolute (l1) or squared (l2) error per example, then the (weighted) batch mean.

  With `weights` of shape [B] the result is mean_b(weights[b] * loss[b]).
  """
  if kind not in LOSSES:
    raise ValueError(f"unknown loss kind {kind!r}: choose one of {', '.join(LOSSES)}")
  if pred.shape != target.shape:
    raise ValueError(f"pred shape {pred.shape} does not match target shape {target.shape}")
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  if weights is not None:
    per_example = per_example * jnp.asarray(weights, jnp.float32)
  return jnp.mean(per_example)
