"""The forward process, its posterior, parameterisation conversions, training targets and the loss.

Every function is pure, jit-able and broadcasts a per-example timestep `t`
(int array of shape [B], or a scalar) over the remaining axes of `x`.

A model predicts one of PREDICTIONS: the noise ε ("eps"), v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0
("v") or x0 itself ("x0"). `prediction_target` is what it learns, `split_prediction` turns
its output back into (x̂0, ε̂), and `loss_weights` gives the per-example weights of
LOSS_WEIGHTINGS ("none", or Hang et al. 2023's "min_snr") for `loss_fn`.

The reverse process p(x_{t-1} | x_t) has the posterior mean at x̂0 and one of
VARIANCES: the posterior variance β̃_t ("fixed_small"), β_t ("fixed_large") or
Nichol & Dhariwal's "learned_range", an interpolation set by extra output
channels v (`split_variance`, `model_log_variance`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax.schedule import Schedule

LOSSES = ("l1", "l2")
PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
  """Raises a ValueError naming `value` and the allowed names unless value is one of them."""
  if value not in allowed:
    raise ValueError(f"{what}={value!r} is unknown: choose one of {', '.join(allowed)}")


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


def split_prediction(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, output: jnp.ndarray, prediction: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(x̂0, ε̂) implied by x_t and a model output of parameterisation `prediction` (one of PREDICTIONS)."""
  _check_choice("prediction", prediction, PREDICTIONS)
  if prediction == "eps":
    return predict_x0_from_eps(schedule, x_t, t, output), output
  if prediction == "v":
    return predict_x0_from_v(schedule, x_t, t, output), predict_eps_from_v(schedule, x_t, t, output)
  return output, predict_eps_from_x0(schedule, x_t, t, output)


def prediction_target(
    schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, prediction: str
) -> jnp.ndarray:
  """The regression target of parameterisation `prediction` for x_t = q_sample(x0, t, noise): ε, v or x0."""
  _check_choice("prediction", prediction, PREDICTIONS)
  if prediction == "eps":
    return noise
  if prediction == "v":
    return get_v(schedule, x0, t, noise)
  return x0


def snr(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """The signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at timesteps t, as float32."""
  return 1.0 / jnp.square(schedule.sqrt_recipm1_alphas_cumprod[jnp.asarray(t)].astype(jnp.float32))


def loss_weights(
    schedule: Schedule, t: jnp.ndarray, *, prediction: str, weighting: str, loss: str, min_snr_gamma: float = 5.0
) -> jnp.ndarray:
  """Per-example float32 loss weights (shape of t) of `weighting` for a model predicting `prediction` under `loss`.

  "none": ones. "min_snr" (Hang et al. 2023, γ = min_snr_gamma) under l2:
  min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v, min(SNR, γ) for x0;
  under l1: the square roots of these.

  Why the square roots under l1: with x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε, an
  x0 error e gives |ε - ε̂| = sqrt(SNR) |e| and |v - v̂| = sqrt(SNR + 1) |e|
  per element, so every parameterisation's error is its x0 error times a
  factor whose square is the factor squared errors carry (SNR, SNR + 1, 1).
  Hang et al. weight the squared x0 error by min(SNR, γ); the l1 counterpart
  weights |e| by sqrt(min(SNR, γ)). These weights give that for ε, v and x0
  alike, keep the plain l1 ε loss (weight 1) where SNR <= γ, as the paper
  keeps the plain l2 ε loss, and cap the x0 weight at sqrt(γ). The l2
  weights applied to l1 would instead weight |e| by min(SNR, γ) / sqrt(SNR)
  for ε: sqrt(SNR) below γ, not the plain loss, and falling as
  γ / sqrt(SNR) above it, not capped at a constant.
  """
  _check_choice("prediction", prediction, PREDICTIONS)
  _check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
  _check_choice("loss", loss, LOSSES)
  if weighting == "none":
    return jnp.ones(jnp.shape(t), jnp.float32)
  if not isinstance(min_snr_gamma, jax.Array) and not float(min_snr_gamma) > 0.0:
    raise ValueError(f"min_snr_gamma={min_snr_gamma!r} is invalid: it must be positive")
  ratio = snr(schedule, t)
  clipped = jnp.minimum(ratio, jnp.asarray(min_snr_gamma, jnp.float32))
  squared = {"eps": clipped / ratio, "v": clipped / (ratio + 1.0), "x0": clipped}[prediction]
  return squared if loss == "l2" else jnp.sqrt(squared)


def q_posterior_mean_variance(
    schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
  var = extract(schedule.posterior_variance, t, x_t)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, var, log_var


def split_variance(output: jnp.ndarray, x: jnp.ndarray) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
  """(prediction, v) of a model output with x's C channels (v None) or 2C: the prediction, then v in [-1, 1]."""
  c = x.shape[-1]
  if output.shape[-1] == c:
    return output, None
  if output.shape[-1] == 2 * c:
    return output[..., :c], output[..., c:]
  raise ValueError(f"the model output has {output.shape[-1]} channels: expected {c} (the input's) or {2 * c} "
                   "(a prediction and a learned variance)")


def model_log_variance(schedule: Schedule, t: jnp.ndarray, x: jnp.ndarray, variance: str,
                       v: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """log σ_t² of p(x_{t-1} | x_t) under `variance` (one of VARIANCES), broadcast against x.

  "fixed_small": log β̃_t, clipped at t = 0 to log β̃_1 (the posterior
  variance is 0 there). "fixed_large": log β_t, and log β̃_1 at t = 0, as the
  DDPM code does so that the decoder stays sharp. "learned_range" (Nichol &
  Dhariwal 2021): frac log β_t + (1 - frac) log β̃_t (clipped) with
  frac = (v + 1) / 2 for the model's v, nominally in [-1, 1] (values outside
  extrapolate, as in their code).
  """
  _check_choice("variance", variance, VARIANCES)
  if (variance == "learned_range") != (v is not None):
    raise ValueError(f"variance={variance!r} " + ("needs the model's v (an output of twice the input's channels)"
                                                  if v is None else "takes no v: the model learns its variance, use "
                                                  "variance='learned_range'"))
  small = extract(schedule.posterior_log_variance_clipped, t, x)
  if variance == "fixed_small":
    return jnp.broadcast_to(small, x.shape)
  if variance == "fixed_large":
    large = jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))
    return jnp.broadcast_to(extract(large, t, x), x.shape)
  large = extract(jnp.log(schedule.betas), t, x)
  frac = (v.astype(x.dtype) + 1.0) / 2.0
  return frac * large + (1.0 - frac) * small


def loss_fn(
    pred: jnp.ndarray, target: jnp.ndarray, kind: str = "l1", weights: Optional[jnp.ndarray] = None
) -> jnp.ndarray:
  """Mean absolute (l1) or squared (l2) error per example, then the (weighted) batch mean.

  With `weights` of shape [B] the result is mean_b(weights[b] * loss[b]); min-SNR weights for l1 are the square
  roots of those for l2 (`loss_weights` says why).
  """
  if kind not in LOSSES:
    raise ValueError(f"loss={kind!r} is unknown: choose one of {', '.join(LOSSES)}")
  if pred.shape != target.shape:
    raise ValueError(f"pred shape {pred.shape} does not match target shape {target.shape}")
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  if weights is not None:
    per_example = per_example * jnp.asarray(weights, jnp.float32)
  return jnp.mean(per_example)


def example_keys(key: jax.Array, batch: int, index_offset: jnp.ndarray | int = 0) -> jax.Array:
  """One key per example, a function of (key, the example's global index) alone."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, index_offset + jnp.arange(batch))
