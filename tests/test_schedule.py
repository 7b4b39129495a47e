"""Schedules against an independent float64 reference written with plain Python loops."""

import math
import re

import numpy as np
import pytest

from ddpm_jax.schedule import SCHEDULES, make_schedule


T = 1000
B0, B1 = 1e-4, 0.02


def reference_betas(name, t=T, b0=B0, b1=B1):
  """Betas from the published formulas, one element at a time in float64."""
  if name == "linear":
    return [b0 + (b1 - b0) * i / (t - 1) for i in range(t)]
  if name == "quadratic":
    return [(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (t - 1)) ** 2 for i in range(t)]
  if name == "sigmoid":
    return [b0 + (b1 - b0) / (1 + math.exp(-(-6 + 12 * i / (t - 1)))) for i in range(t)]
  abar = lambda u: math.cos((u / t + 0.008) / 1.008 * math.pi / 2) ** 2
  cos = [min(1 - abar(i + 1) / abar(i), 0.999) for i in range(t)]
  if name == "cosine":
    return cos
  return [min(max(b, b0), b1) for b in cos]  # book_cosine


def reference_coefficients(betas):
  """ᾱ, ᾱ_prev and the posterior coefficients, from the DDPM paper's equations."""
  out = {k: [] for k in ("abar", "abar_prev", "var", "c1", "c2")}
  prod = 1.0
  for b in betas:
    prev, prod = prod, prod * (1 - b)
    out["abar"].append(prod)
    out["abar_prev"].append(prev)
    out["var"].append(b * (1 - prev) / (1 - prod))
    out["c1"].append(b * math.sqrt(prev) / (1 - prod))
    out["c2"].append((1 - prev) * math.sqrt(1 - b) / (1 - prod))
  return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_float64_reference(name):
  s = make_schedule(name, T, B0, B1)
  betas = reference_betas(name)
  ref = reference_coefficients(betas)
  # float32 storage rounds each value by at most 2**-24 ≈ 6e-8 relative.
  check = lambda got, want: np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0)
  check(s.betas, betas)
  check(s.alphas, 1 - np.array(betas))
  check(s.alphas_cumprod, ref["abar"])
  check(s.alphas_cumprod_prev, ref["abar_prev"])
  check(s.sqrt_alphas_cumprod, np.sqrt(ref["abar"]))
  check(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ref["abar"]))
  check(s.posterior_variance, ref["var"])
  check(s.posterior_log_variance_clipped, np.log(np.r_[ref["var"][1], ref["var"][1:]]))
  check(s.posterior_mean_coef1, ref["c1"])
  check(s.posterior_mean_coef2, ref["c2"])
  for field in ("betas", "alphas_cumprod", "posterior_variance"):
    arr = getattr(s, field)
    assert arr.dtype == np.float32 and arr.shape == (T,)
  assert s.num_timesteps == T


def test_book_cosine_facts():
  s = make_schedule("book_cosine", 1000, 1e-4, 0.02)
  betas = np.asarray(s.betas)
  assert np.all(betas[:13] == np.float32(1e-4)) and betas[13] > np.float32(1e-4)
  assert np.all(betas[-98:] == np.float32(0.02)) and betas[-99] < np.float32(0.02)
  assert abs(float(s.alphas_cumprod[999]) - 0.00319) < 1e-5  # 0.0031948 in float64


def test_schedule_is_a_pytree_that_jit_accepts():
  import jax
  s = make_schedule("linear", 10)
  doubled = jax.jit(lambda sch: jax.tree_util.tree_map(lambda a: 2 * a, sch))(s)
  np.testing.assert_array_equal(doubled.betas, 2 * np.asarray(s.betas))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="exponential"), "unknown schedule 'exponential'"),
        (dict(num_timesteps=1), "num_timesteps=1"),
        (dict(num_timesteps=2.5), "num_timesteps=2.5"),
        (dict(beta_start=0.0), "beta_start=0.0"),
        (dict(beta_end=1.0), "beta_end=1.0"),
        (dict(beta_start=-0.1), "beta_start=-0.1"),
        (dict(beta_start=0.03, beta_end=0.02), "beta_start=0.03 > beta_end=0.02"),
        (dict(name="cosine", max_beta=1.5), "max_beta=1.5"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, fragment):
  with pytest.raises(ValueError, match="^" + re.escape(fragment)):
    make_schedule(**kwargs)
