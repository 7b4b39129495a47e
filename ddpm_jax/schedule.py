"""Beta schedules and the precomputed diffusion coefficients built from them."""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine", "book_cosine", "quadratic", "sigmoid")


@flax.struct.dataclass
class Schedule:
  """Per-timestep float32 coefficients of a discrete diffusion, indexed by t = 0 .. T-1.

  `alphas_cumprod[t]` is ᾱ after t + 1 noising steps; `alphas_cumprod_prev[t]`
  is ᾱ after t steps (1.0 at t = 0).
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps."""
    return self.betas.shape[-1]


def _linear(t: int, start: float, end: float) -> np.ndarray:
  """Betas evenly spaced from start to end."""
  return np.linspace(start, end, t, dtype=np.float64)


def _quadratic(t: int, start: float, end: float) -> np.ndarray:
  """Betas whose square roots are evenly spaced."""
  return np.linspace(start**0.5, end**0.5, t, dtype=np.float64) ** 2


def _sigmoid(t: int, start: float, end: float) -> np.ndarray:
  """Betas following a logistic curve over [-6, 6], scaled into [start, end]."""
  x = np.linspace(-6.0, 6.0, t, dtype=np.float64)
  return start + (end - start) / (1.0 + np.exp(-x))


def cosine_betas(t: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine betas: ᾱ(u) ∝ cos²((u/T + s)/(1 + s) · π/2), capped at max_beta."""
  u = np.arange(t + 1, dtype=np.float64) / t
  f = np.cos((u + s) / (1.0 + s) * np.pi / 2.0) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _check_unit(name: str, value: float) -> None:
  """Raises unless 0 < value < 1."""
  if not 0.0 < value < 1.0:
    raise ValueError(f"{name}={value!r} is out of range: it must lie strictly between 0 and 1")


def make_betas(
    name: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
  """The float64 betas of a named schedule, validated."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
    raise ValueError(f"num_timesteps={num_timesteps!r} is invalid: it must be an integer >= 2")
  _check_unit("beta_start", beta_start)
  _check_unit("beta_end", beta_end)
  _check_unit("max_beta", max_beta)
  if beta_start > beta_end:
    raise ValueError(f"beta_start={beta_start!r} > beta_end={beta_end!r}: beta_start must not exceed beta_end")
  if cosine_s <= 0:
    raise ValueError(f"cosine_s={cosine_s!r} is invalid: it must be > 0")
  builders: dict[str, Callable[[], np.ndarray]] = {
      "linear": lambda: _linear(num_timesteps, beta_start, beta_end),
      "quadratic": lambda: _quadratic(num_timesteps, beta_start, beta_end),
      "sigmoid": lambda: _sigmoid(num_timesteps, beta_start, beta_end),
      "cosine": lambda: cosine_betas(num_timesteps, cosine_s, max_beta),
      "book_cosine": lambda: np.clip(cosine_betas(num_timesteps, cosine_s, max_beta), beta_start, beta_end),
  }
  betas = builders[name]()
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f"schedule {name!r} produced betas outside (0, 1): check its arguments")
  return betas


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Derives every coefficient from betas in float64 on the host, then stores float32."""
  betas = np.asarray(betas, dtype=np.float64)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  # Variance is 0 at t = 0; its log borrows t = 1's value, as the DDPM code does.
  post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
  arrays = dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
  )
  return Schedule(**{k: jax.device_put(np.asarray(v, np.float32)) for k, v in arrays.items()})  # cast on the host


def make_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    **kw,
) -> Schedule:
  """A named schedule's Schedule pytree; `kw` takes `cosine_s` and `max_beta`."""
  return schedule_from_betas(make_betas(name, num_timesteps, beta_start, beta_end, **kw))
