"""Samplers against exact moments of an analytic ε-predictor, a hand DDIM step, and seed semantics."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.sampling import ddim_timesteps, generate, sample
from ddpm_jax.schedule import make_schedule

T = 1000
SCHED = make_schedule("linear", T)
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1 - BETAS)
MU, S = 0.3, 0.2


def analytic_eps(x, t):
  """E[ε | x_t] for data x0 ~ N(MU, S²): the optimal noise predictor."""
  ab = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, *([1] * (x.ndim - 1)))
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S**2 + 1 - ab)


def exact_moments(method, num_steps=T, eta=1.0, variance="fixed_small"):
  """Mean and variance of the sampler's output, propagated through its affine steps in float64."""
  m, v = 0.0, 1.0
  ts = list(range(T - 1, -1, -1)) if method == "ddpm" else list(range(0, T, T // num_steps))[::-1]
  for i, t in enumerate(ts):
    ab = ABAR[t]
    ae = np.sqrt(1 - ab) / (ab * S**2 + 1 - ab)  # eps = ae * x + be
    be = -ae * np.sqrt(ab) * MU
    a0, b0 = (1 - np.sqrt(1 - ab) * ae) / np.sqrt(ab), -np.sqrt(1 - ab) * be / np.sqrt(ab)  # x0 = a0 x + b0
    if method == "ddpm":
      ab_prev = ABAR[t - 1] if t > 0 else 1.0
      c1 = BETAS[t] * np.sqrt(ab_prev) / (1 - ab)
      c2 = (1 - ab_prev) * np.sqrt(1 - BETAS[t]) / (1 - ab)
      a, c = c1 * a0 + c2, c1 * b0
      var = 0.0 if t == 0 else (BETAS[t] * (1 - ab_prev) / (1 - ab) if variance == "fixed_small" else BETAS[t])
    else:
      ab_prev = ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
      var = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
      d = np.sqrt(1 - ab_prev - var)
      a, c = np.sqrt(ab_prev) * a0 + d * ae, np.sqrt(ab_prev) * b0 + d * be
    m, v = a * m + c, a * a * v + var
  return m, v


def test_fifty_step_ddim_discretisation_is_known():
  # The figure: 50-step DDIM with eta=0 lands on variance ≈ 0.031, not S² = 0.04.
  assert abs(exact_moments("ddim", 50, eta=0.0)[1] - 0.031) < 0.001
  # And 1000-step ancestral sampling with the optimal predictor recovers the data law closely.
  m, v = exact_moments("ddpm")
  assert abs(m - MU) < 1e-3 and abs(v - S**2) < 2e-3


N_SAMPLES = 4000  # of 8x8x1: n = 256,000 pixels, so the variance estimate's s.e. is v·sqrt(2/n) = 0.28% of v


@pytest.mark.parametrize("method, num_steps, eta, variance", [
    ("ddpm", None, 1.0, "fixed_small"), ("ddpm", None, 1.0, "fixed_large"),
    ("ddim", 50, 0.0, "fixed_small"), ("ddim", 50, 1.0, "fixed_small"),
    ("ddim", 1000, 0.0, "fixed_small"), ("ddim", 1000, 1.0, "fixed_small"),
])
def test_samples_match_exact_moments(method, num_steps, eta, variance):
  x = sample(analytic_eps, SCHED, jax.random.key(7), (N_SAMPLES, 8, 8, 1), method=method, num_steps=num_steps, eta=eta,
             clip_x0=False, variance=variance)
  x = np.asarray(x, np.float64).ravel()
  m, v = exact_moments(method, num_steps or T, eta, variance)
  n = x.size
  # 4.5 standard errors: the mean's s.e. is sqrt(v/n), the variance's v·sqrt(2/n). Pixels are independent
  # (a per-pixel affine chain driven by independent noise), so n counts every pixel.
  assert abs(x.mean() - m) < 4.5 * np.sqrt(v / n)
  assert abs(x.var() - v) < 4.5 * v * np.sqrt(2 / n)
  if method == "ddpm":
    # The two variances' outputs differ by 4.8%, over three times the 1.3% band: the test tells them apart.
    other = exact_moments("ddpm", variance="fixed_large" if variance == "fixed_small" else "fixed_small")[1]
    assert abs(x.var() - other) > 2 * 4.5 * v * np.sqrt(2 / n)


def test_ddim_eta0_is_deterministic_and_one_step_matches_numpy():
  eps_fn = lambda x, t: 0.5 * x + 0.1 * jnp.sin(3 * x) + 1e-4 * t[:, None, None, None]
  x_T = jax.random.normal(jax.random.key(0), (3, 4, 4, 2)) * 1.5
  run = lambda key: sample(eps_fn, SCHED, key, x_T.shape, method="ddim", num_steps=2, eta=0.0, x_T=x_T,
                           return_trajectory=True)
  (x0_a, traj_a), (x0_b, _) = run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(x0_a, x0_b)
  # By hand: t = 500 -> t_prev = 0, x̂0 clipped to [-1, 1] and ε recomputed from it.
  x = np.asarray(x_T, np.float64)
  ab, ab_prev = ABAR[500], ABAR[0]
  eps = 0.5 * x + 0.1 * np.sin(3 * x) + 1e-4 * 500
  x0 = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
  eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
  want = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * eps
  assert traj_a.shape == (2, 3, 4, 4, 2)
  np.testing.assert_allclose(traj_a[0], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(traj_a[1], x0_a)


def test_ddim_timesteps_are_the_books_leading_spacing():
  np.testing.assert_array_equal(ddim_timesteps(1000, 50), np.arange(0, 1000, 20)[::-1])
  assert ddim_timesteps(1000, 50)[0] == 980 and ddim_timesteps(1000, 3).tolist() == [666, 333, 0]


def test_trajectory_stride_keeps_every_kth_state():
  eps_fn = lambda x, t: 0.1 * x
  key = jax.random.key(3)
  _, full = sample(eps_fn, SCHED, key, (2, 2, 2, 1), method="ddim", num_steps=10, return_trajectory=True)
  _, strided = sample(eps_fn, SCHED, key, (2, 2, 2, 1), method="ddim", num_steps=10, return_trajectory=True,
                      trajectory_stride=5)
  assert full.shape[0] == 10 and strided.shape[0] == 2
  np.testing.assert_array_equal(strided, full[4::5])


def test_chain_traces_the_model_once_whatever_the_number_of_steps():
  calls = []

  def eps_fn(x, t):
    calls.append(1)
    return 0.1 * x

  for steps in (10, 100, 1000):
    calls.clear()
    sample(eps_fn, SCHED, jax.random.key(0), (1, 2, 2, 1), method="ddim", num_steps=steps)
    assert len(calls) == 1, (steps, len(calls))
  calls.clear()
  sample(eps_fn, SCHED, jax.random.key(1), (1, 2, 2, 1), method="ddim", num_steps=1000, eta=0.3)
  assert not calls  # same shapes, new key and eta: the compiled chain is reused


def test_sample_i_does_not_depend_on_the_batch():
  apply = lambda p, x, t: p * x + 0.01 * jnp.cos(x)
  kw = dict(method="ddim", num_steps=20, eta=1.0)
  key = jax.random.key(11)
  ref = generate(apply, 0.2, SCHED, key, 16, (3, 3, 1), batch_size=16, **kw)
  for bs in (1, 7):
    np.testing.assert_allclose(generate(apply, 0.2, SCHED, key, 16, (3, 3, 1), batch_size=bs, **kw), ref,
                               rtol=1e-6, atol=1e-6)
  # Fewer samples are a prefix of more.
  np.testing.assert_allclose(generate(apply, 0.2, SCHED, key, 5, (3, 3, 1), batch_size=16, **kw), ref[:5],
                             rtol=1e-6, atol=1e-6)


def test_sample_i_is_the_same_on_one_and_four_devices():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from ddpm_jax.sampling import generate
      from ddpm_jax.schedule import make_schedule
      assert jax.local_device_count() == 4
      apply = lambda p, x, t: p * x + 0.01 * jnp.cos(x)
      args = (apply, 0.2, make_schedule("linear", 1000), jax.random.key(11), 10, (3, 3, 1))
      one = generate(*args, batch_size=8, devices=jax.local_devices()[:1], method="ddim", num_steps=20)
      four = generate(*args, batch_size=8, method="ddim", num_steps=20)
      np.testing.assert_allclose(one, four, rtol=1e-6, atol=1e-6)
      print("OK", four.shape)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK (10, 3, 3, 1)" in out.stdout


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="euler"), "unknown sampling method 'euler'"),
    (dict(method="ddim", num_steps=0), "num_steps=0 is invalid"),
    (dict(method="ddim", num_steps=1001), "num_steps=1001 is invalid"),
    (dict(method="ddpm", num_steps=50), "num_steps=50 with method='ddpm'"),
    (dict(method="ddim", num_steps=10, eta=1.5), "eta=1.5 is out of range"),
    (dict(variance="learned"), "unknown variance 'learned'"),
    (dict(x_T=jnp.zeros((1, 2, 2, 1))), "x_T has shape (1, 2, 2, 1), expected (2, 2, 2, 1)"),
    (dict(method="ddim", num_steps=10, return_trajectory=True, trajectory_stride=3), "trajectory_stride=3"),
])
def test_bad_arguments_raise_clear_errors(kwargs, fragment):
  with pytest.raises(ValueError, match="^" + re.escape(fragment)):
    sample(lambda x, t: x, SCHED, jax.random.key(0), (2, 2, 2, 1), **kwargs)
