"""Samplers against exact moments of analytic ε-, v- and x0-predictors, float64 NumPy references
(a hand DDIM step, DPM-Solver++(2M)), the timestep spacings of docs/architecture.md, and seed semantics."""

import functools
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import sampling
from ddpm_jax.sampling import SPACINGS, SamplerOptions, make_generator, sample, timesteps
from ddpm_jax.schedule import make_betas, make_schedule
from helpers import run_python


T = 1000
SCHED = make_schedule("linear", T)
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1 - BETAS)
MU, S = 0.3, 0.2


def analytic_eps(x, t):
  """E[ε | x_t] for data x0 ~ N(MU, S²): the optimal noise predictor."""
  ab = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, *([1] * (x.ndim - 1)))
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S**2 + 1 - ab)


def _alpha_sigma(x, t):
  """sqrt(ᾱ_t), sqrt(1 - ᾱ_t) in float32, shaped to broadcast against x."""
  ab = jnp.asarray(ABAR, jnp.float32)[t].reshape(-1, *([1] * (x.ndim - 1)))
  return jnp.sqrt(ab), jnp.sqrt(1 - ab)


def analytic_x0(x, t):
  """E[x0 | x_t] for data x0 ~ N(MU, S²): the optimal x0 predictor (Gaussian conditioning)."""
  a, s = _alpha_sigma(x, t)
  return MU + a * S**2 * (x - a * MU) / (a * a * S**2 + s * s)


def analytic_v(x, t):
  """E[v | x_t] = sqrt(ᾱ) E[ε | x_t] - sqrt(1 - ᾱ) E[x0 | x_t] for data x0 ~ N(MU, S²), as one closed form."""
  a, s = _alpha_sigma(x, t)
  return a * s * (1 - S**2) * (x - a * MU) / (a * a * S**2 + s * s) - s * MU


ANALYTIC = {"eps": analytic_eps, "v": analytic_v, "x0": analytic_x0}


def analytic_x0_64(x, t):
  """analytic_x0 in float64 NumPy."""
  a, s2 = np.sqrt(ABAR[t]), 1 - ABAR[t]
  return MU + a * S**2 * (x - a * MU) / (a * a * S**2 + s2)


def design_timesteps(method, T, n, spacing):
  """The timestep formulas of docs/architecture.md for DDIM and DPM-Solver, written out literally."""
  if spacing == "trailing":
    return np.round(np.arange(T, 0, -T / n)) - 1
  if spacing == "leading":
    return (np.arange(n) * (T // n))[::-1] if method == "ddim" else (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1]
  if method == "ddim":
    return np.round(np.linspace(0, T - 1, n))[::-1]
  return np.round(np.linspace(0, T - 1, n + 1))[::-1][:-1]


def dpmpp_2m_numpy(x_T, ts, x0_model):
  """DPM-Solver++(2M) of Lu et al. 2022 (multistep, data prediction, in λ = log(α/σ)) in float64.

  First order on the first step and on the last, which goes to σ = 0; returns (x_0, x after every step).
  """
  ts = np.asarray(ts, np.int64)
  alpha, sigma = np.sqrt(ABAR[ts]), np.sqrt(1 - ABAR[ts])
  lam = np.log(alpha / sigma)
  x, prev, traj = np.asarray(x_T, np.float64), None, []
  for i, t in enumerate(ts):
    d = x0_model(x, t)
    if i == len(ts) - 1:
      x = d  # σ_next = 0, α_next = 1: e^{-h} = 0 and x_next = x̂0
    else:
      h = lam[i + 1] - lam[i]
      if i > 0:
        r = (lam[i] - lam[i - 1]) / h
        d_used = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev
      else:
        d_used = d
      x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1) * d_used
    prev = d
    traj.append(x)
  return x, np.stack(traj)


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


N_SAMPLES = 4000  # of 8x8x1: n = 256,000 pixels, so the variance estimate's s.e. is v·sqrt(2/n) = 0.28% of v


@pytest.mark.optimized  # 1,000-step chains: run time, not compile time
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
  np.testing.assert_array_equal(timesteps("ddim", 1000, 50), np.arange(0, 1000, 20)[::-1])
  assert timesteps("ddim", 1000, 50)[0] == 980 and timesteps("ddim", 1000, 3).tolist() == [666, 333, 0]


SPACING_CASES = [(1000, 50), (1000, 10), (1000, 1), (1000, 2), (1000, 7), (1000, 333), (1000, 999), (1000, 1000),
                 (10, 3), (37, 6), (4000, 33), (4000, 4000)]


def test_timesteps_follow_the_design_formulas():
  for T_, n in SPACING_CASES:
    for method in ("ddim", "dpmpp_2m"):
      for spacing in SPACINGS:
        if method == "dpmpp_2m" and spacing != "trailing" and n == T_:
          continue  # n + 1 points do not fit in T: rejected (checked in the next tests)
        want = design_timesteps(method, T_, n, spacing)
        assert len(want) == n, (T_, n, method, spacing)  # no float-arange overshoot in these cases
        got = timesteps(method, T_, n, spacing)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want, err_msg=f"T={T_} num_steps={n} {method} {spacing}")


def test_timesteps_known_cases():
  # The book's 50-step DDIM: 980, 960, ..., 0.
  assert timesteps("ddim", 1000, 50).tolist() == list(range(980, -1, -20))
  # Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Table 2, T = 1000, 10 steps,
  # shifted to 0-based t: the three spacings of diffusers' DDIMScheduler.
  assert timesteps("ddim", 1000, 10, "leading").tolist() == list(range(900, -1, -100))
  assert timesteps("ddim", 1000, 10, "trailing").tolist() == list(range(999, 0, -100))
  assert timesteps("ddim", 1000, 10, "linspace").tolist() == list(range(999, -1, -111))
  # DPM-Solver spaces num_steps + 1 points and drops t = 0: leading uses 1000 // 11 = 90; linspace(0, 999, 10) is
  # the multiples of 111; trailing is DDIM's.
  assert timesteps("dpmpp_2m", 1000, 10, "leading").tolist() == list(range(900, 0, -90))
  assert timesteps("dpmpp_2m", 1000, 9, "linspace").tolist() == list(range(999, 0, -111))
  assert timesteps("dpmpp_2m", 1000, 10, "trailing").tolist() == list(range(999, 0, -100))
  # DDPM visits every t whatever the spacing.
  for spacing in SPACINGS:
    np.testing.assert_array_equal(timesteps("ddpm", 1000, None, spacing), np.arange(999, -1, -1))
  # T = 15, 13 trailing steps: round(15 - 15 k / 13) - 1 for k = 0..12, by hand. The literal float arange
  # overshoots here with a 14th point that rounds to t = -1; timesteps keeps the 13 the spacing means.
  assert len(design_timesteps("ddim", 15, 13, "trailing")) == 14
  assert timesteps("ddim", 15, 13, "trailing").tolist() == [14, 13, 12, 11, 9, 8, 7, 6, 5, 4, 2, 1, 0]


def test_timesteps_are_distinct_descending_and_in_range_for_every_count():
  for T_ in (10, 17, 64):
    for method in ("ddim", "dpmpp_2m"):
      for spacing in SPACINGS:
        top = T_ - 1 if method == "dpmpp_2m" and spacing != "trailing" else T_
        for n in range(1, top + 1):
          ts = timesteps(method, T_, n, spacing)
          assert len(ts) == n and ts[0] <= T_ - 1 and ts[-1] >= 0 and (np.diff(ts) < 0).all(), (T_, method, spacing, n)
        if top < T_:
          message = f"num_steps={T_} is invalid: it must be an integer in [1, {top}]"
          with pytest.raises(ValueError, match=re.escape(message)):
            timesteps(method, T_, T_, spacing)
        assert len(timesteps(method, T_, None, spacing)) == top  # None: as many steps as the spacing allows


X_T = np.asarray(jax.random.normal(jax.random.key(5), (2000, 4, 4, 1)))  # 32,000 independent pixels


@functools.lru_cache(maxsize=None)
def dpmpp_run(num_steps, spacing="leading"):
  """DPM-Solver++(2M) from X_T with the optimal ε-predictor: (x_0, trajectory) as float64 NumPy."""
  x0, traj = sample(analytic_eps, SCHED, jax.random.key(0), X_T.shape, method="dpmpp_2m", num_steps=num_steps,
                    x_T=X_T, clip_x0=False, return_trajectory=True, timestep_spacing=spacing)
  return np.asarray(x0, np.float64), np.asarray(traj, np.float64)


@pytest.mark.parametrize("num_steps, spacing", [(10, "leading"), (25, "leading"), (100, "leading"),
                                                (25, "trailing"), (25, "linspace")])
def test_dpmpp_2m_matches_a_float64_numpy_reference(num_steps, spacing):
  x0, traj = dpmpp_run(num_steps, spacing)
  want_x0, want_traj = dpmpp_2m_numpy(X_T, design_timesteps("dpmpp_2m", T, num_steps, spacing), analytic_x0_64)
  assert traj.shape == (num_steps,) + X_T.shape
  # float32 against float64: each step rounds x (|x| <= 5) and its coefficients to a few ulps (~1e-6) and the
  # steps contract (σ_next / σ < 1), so the error stays near 1e-6 (measured: <= 2.2e-6 over 100 steps). 1e-5
  # is far below what a wrong step changes (a wrong r or h moves x by > 1e-3).
  np.testing.assert_allclose(traj, want_traj, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x0, want_x0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(traj[-1], x0)


def test_dpmpp_2m_moments_approach_the_data_moments():
  # The output is an affine map of x_T per pixel. The exact probability-flow ODE from t_0 maps x_T to
  # MU + S (x_T - α MU) / sqrt(α² S² + σ²), so comparing with that map on the same X_T removes the sampling noise.
  errors = []
  for n in (10, 25, 100):
    x0 = dpmpp_run(n)[0]
    ab = ABAR[timesteps("dpmpp_2m", T, n)[0]]
    exact = MU + S * (X_T - np.sqrt(ab) * MU) / np.sqrt(ab * S**2 + 1 - ab)
    errors.append(abs(x0.var() / exact.var() - 1))
    assert abs(x0.mean() - exact.mean()) < 1e-3
  # Measured: 71%, 33%, 2.6% (the last step jumps from t = 90, 38 or 9 straight to x̂0, which is what DPM-Solver++
  # with a zero final sigma does). A second-order solver shrinks the error ~16x from 25 to 100 steps, a first-order
  # one (DDIM) only ~4x: require 8x, and under 3% at 100 steps.
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[1] / errors[2] > 8, errors
  assert errors[2] < 0.03, errors
  # Against the data law N(MU, S²): 4.5 standard errors of the 32,000-pixel estimates (sqrt(S²/n) for the mean,
  # sqrt(2/n) relative for the variance) plus the 3% discretisation bound; starting from N(0, 1) rather than the
  # exact marginal at t_0 = 990 shifts the mean by ~4e-4 and the variance by < 1e-4, inside the 1e-3 slack.
  x0 = dpmpp_run(100)[0]
  m = x0.size
  assert abs(x0.mean() - MU) < 4.5 * np.sqrt(S**2 / m) + 1e-3
  assert abs(x0.var() / S**2 - 1) < 0.03 + 4.5 * np.sqrt(2 / m)


def test_dpmpp_2m_clips_x0_and_its_last_step_returns_it():
  eps_fn = lambda x, t: 0.5 * x + 0.1 * jnp.sin(3 * x) + 1e-4 * t[:, None, None, None]
  x_T = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 4, 2)) * 1.5)

  def x0_model(x, t):  # the same model, its x̂0 clipped to [-1, 1], in float64
    ab = ABAR[t]
    eps = 0.5 * x + 0.1 * np.sin(3 * x) + 1e-4 * t
    return np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)

  x0, traj = sample(eps_fn, SCHED, jax.random.key(1), x_T.shape, method="dpmpp_2m", num_steps=4, x_T=x_T,
                    return_trajectory=True)
  want_x0, want_traj = dpmpp_2m_numpy(x_T, timesteps("dpmpp_2m", T, 4), x0_model)
  assert np.abs(want_traj[0]).max() > 1.5  # the clip is active: x̂0 would leave [-1, 1]
  np.testing.assert_allclose(traj, want_traj, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(traj[-1], x0)
  assert np.abs(np.asarray(x0)).max() <= 1.0


@pytest.mark.parametrize("method, num_steps, clip_x0", [("ddpm", None, True), ("ddim", 50, True),
                                                     ("ddim", 50, False), ("dpmpp_2m", 25, True)])
def test_eps_v_and_x0_models_give_the_same_samples(method, num_steps, clip_x0):
  # The three optimal predictors describe one denoiser, and split_prediction's conversions are exact, so with the
  # same key every sampler must draw the same x_0 up to float32 rounding (DDIM with eta=1). DDIM without clipping
  # is the one sampler that uses split_prediction's ε̂ (the others use x̂0, or ε̂ recomputed from clipped x̂0).
  # Measured: <= 6e-7 (a few ulps of |x| < 1; the chains contract rounding); 1e-5 leaves room for other CPUs and
  # XLA fusion while any wrong conversion moves x_0 by O(0.1).
  out = {p: np.asarray(sample(ANALYTIC[p], SCHED, jax.random.key(9), (64, 4, 4, 1), method=method, num_steps=num_steps,
                              prediction=p, clip_x0=clip_x0), np.float64) for p in diffusion.PREDICTIONS}
  assert out["eps"].std() > 0.1
  for p in ("v", "x0"):
    np.testing.assert_allclose(out[p], out["eps"], rtol=0, atol=1e-5, err_msg=p)


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


def _generator(batch_size, devices=None, **options):
  """A generator of 3x3x1 samples from the model p·x + 0.01·cos(x) with params p."""
  model = lambda p, x, t: p * x + 0.01 * jnp.cos(x)
  return make_generator(model, SCHED, (3, 3, 1), SamplerOptions(**options), batch_size=batch_size, devices=devices)


def test_sample_i_does_not_depend_on_the_batch():
  kw = dict(method="ddim", num_steps=20, eta=1.0)
  key = jax.random.key(11)
  ref = _generator(16, **kw)(0.2, key, 16)
  for bs in (1, 7):
    np.testing.assert_allclose(_generator(bs, **kw)(0.2, key, 16), ref, rtol=1e-6, atol=1e-6)
  # Fewer samples are a prefix of more.
  np.testing.assert_allclose(_generator(16, **kw)(0.2, key, 5), ref[:5], rtol=1e-6, atol=1e-6)


def test_generator_compiles_once_and_passes_every_option_through():
  traces = []
  model = lambda p, x, t: (traces.append(1), p * x + 0.01 * jnp.cos(x))[1]
  options = SamplerOptions(method="ddim", num_steps=5, timestep_spacing="trailing", prediction="v")
  generate = make_generator(model, SCHED, (3, 3, 1), options, batch_size=6)
  key = jax.random.key(4)
  got = generate(0.2, key, 6)
  np.testing.assert_allclose(got, sample(functools.partial(model, 0.2), SCHED, key, (6, 3, 3, 1), method="ddim",
                                         num_steps=5, timestep_spacing="trailing", prediction="v"),
                             rtol=1e-6, atol=1e-6)
  traces.clear()
  for p in (0.3, 0.4):  # new parameters, new key, more batches: the compiled sampler is reused
    generate(p, jax.random.key(5), 13)
  assert not traces
  assert np.abs(got - _generator(6, method="ddim", num_steps=5)(0.2, key, 6)).max() > 1e-3  # the options mattered


def test_sample_i_is_the_same_on_one_and_four_devices():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from ddpm_jax.sampling import SamplerOptions, make_generator
      from ddpm_jax.schedule import make_betas, make_schedule
      assert jax.local_device_count() == 4
      model = lambda p, x, t: p * x + 0.01 * jnp.cos(x)
      args = (model, make_schedule("linear", 1000), (3, 3, 1), SamplerOptions(method="ddim", num_steps=20))
      one = make_generator(*args, batch_size=8, devices=jax.local_devices()[:1])(0.2, jax.random.key(11), 10)
      four = make_generator(*args, batch_size=8)(0.2, jax.random.key(11), 10)
      np.testing.assert_allclose(one, four, rtol=1e-6, atol=1e-6)
      print("OK", four.shape)
  """)
  out = run_python("-c", code, devices=4)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK (10, 3, 3, 1)" in out.stdout


def test_ddpm_with_clipping_matches_a_hand_computed_chain():
  sched = make_schedule("linear", 4, 0.1, 0.4)  # four steps, so every coefficient matters
  betas = np.linspace(0.1, 0.4, 4)
  abar = np.cumprod(1 - betas)
  eps_fn = lambda x, t: 0.5 * x + 2.0  # drives x̂0 far outside [-1, 1]: the clip is active at every step
  key = jax.random.key(3)
  x_T = np.asarray(jax.random.normal(jax.random.key(9), (2, 2, 2, 1)), np.float64)
  got = sample(eps_fn, sched, key, x_T.shape, method="ddpm", x_T=jnp.asarray(x_T, jnp.float32), clip_x0=True)
  keys = diffusion.example_keys(key, 2)
  x = x_T
  for i, t in enumerate(range(3, -1, -1)):
    ab, ab_prev = abar[t], (abar[t - 1] if t > 0 else 1.0)
    x0 = np.clip((x - np.sqrt(1 - ab) * (0.5 * x + 2.0)) / np.sqrt(ab), -1, 1)
    mean = (betas[t] * np.sqrt(ab_prev) * x0 + (1 - ab_prev) * np.sqrt(1 - betas[t]) * x) / (1 - ab)
    var = betas[t] * (1 - ab_prev) / (1 - ab)
    z = np.asarray(sampling._normal(keys, i + 1, x.shape[1:]), np.float64)  # the chain's noise for step i
    x = mean + (np.sqrt(var) * z if t > 0 else 0.0)
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got)).max() <= 1.0  # the last step returns the clipped x̂0


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="euler"), "method='euler' is unknown: choose one of ddpm, ddim, dpmpp_2m"),
    (dict(method="ddim", num_steps=0), "num_steps=0 is invalid"),
    (dict(method="ddim", num_steps=1001), "num_steps=1001 is invalid"),
    (dict(method="ddpm", num_steps=1001), "num_steps=1001 is invalid: it must be an integer in [1, 1000]"),
    (dict(method="ddim", num_steps=10, eta=1.5), "eta=1.5 is out of range"),
    (dict(variance="learned"), "variance='learned' is unknown: choose one of fixed_small, fixed_large"),
    (dict(x_T=jnp.zeros((1, 2, 2, 1))), "x_T has shape (1, 2, 2, 1), expected (2, 2, 2, 1)"),
    (dict(method="ddim", num_steps=10, timestep_spacing="karras"),
     "timestep_spacing='karras' is unknown: choose one of leading, trailing, linspace"),
    (dict(prediction="score"), "prediction='score' is unknown: choose one of eps, v, x0"),
    (dict(method="dpmpp_2m", num_steps=1000), "num_steps=1000 is invalid: it must be an integer in [1, 999] "
     "(method='dpmpp_2m' with timestep_spacing='leading' needs num_steps + 1 <= T)"),
    (dict(method="dpmpp_2m", num_steps=0, timestep_spacing="trailing"), "num_steps=0 is invalid: it must be an "
     "integer in [1, 1000]"),
    (dict(method="ddim", num_steps=10, return_trajectory=True, trajectory_stride=3), "trajectory_stride=3"),
])
def test_bad_arguments_raise_clear_errors(kwargs, fragment):
  with pytest.raises(ValueError, match="^" + re.escape(fragment)):
    sample(lambda x, t: x, SCHED, jax.random.key(0), (2, 2, 2, 1), **kwargs)


def test_options_and_keyword_settings_draw_the_same_samples_and_keywords_override_options():
  # A toy model whose output depends on x and t, so that a setting lost on the way changes the samples.
  model = lambda x, t: 0.5 * x + 1e-3 * t[:, None, None, None]
  key, shape = jax.random.key(3), (3, 2, 2, 1)
  options = SamplerOptions(method="ddim", num_steps=7, eta=0.3, timestep_spacing="trailing", clip_x0=False)
  by_options = np.asarray(sample(model, SCHED, key, shape, options))
  by_keywords = np.asarray(sample(model, SCHED, key, shape, method="ddim", num_steps=7, eta=0.3,
                                  timestep_spacing="trailing", clip_x0=False))
  np.testing.assert_array_equal(by_options, by_keywords)
  eta0 = np.asarray(sample(model, SCHED, key, shape, options, eta=0.0))
  np.testing.assert_array_equal(eta0, np.asarray(sample(model, SCHED, key, shape, method="ddim", num_steps=7,
                                                        eta=0.0, timestep_spacing="trailing", clip_x0=False)))
  assert np.abs(eta0 - by_options).max() > 1e-3  # the keyword replaced the option's eta
  with pytest.raises(TypeError, match="steps"):
    sample(model, SCHED, key, shape, options, steps=10)


# A labelled toy model: output = a_label * x + 0.01 cos(x); a_{NO_LABEL} is the unconditional slope.
SLOPES = jnp.array([0.1, 0.4, -0.3, 0.2])  # labels 0, 1, 2, then NO_LABEL (-1) reads the last entry


def labelled_model(x, t, labels):
  return SLOPES[labels].reshape(-1, 1, 1, 1) * x + 0.01 * jnp.cos(x)


def test_guidance_is_the_formula_with_one_batched_call_and_one_call_at_w_1():
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  t = jnp.array([10, 20, 30])
  labels = jnp.array([0, 1, 2])
  calls = []
  counted = lambda x, t, labels: (calls.append(x.shape[0]), labelled_model(x, t, labels))[1]
  cond = np.asarray(labelled_model(x, t, labels), np.float64)
  uncond = np.asarray(labelled_model(x, t, jnp.full(3, -1)), np.float64)
  for w in (0.0, 2.5):
    calls.clear()
    got = np.asarray(sampling.guided(counted, labels, w, one_call=False)(x, t), np.float64)
    np.testing.assert_allclose(got, uncond + w * (cond - uncond), rtol=1e-6, atol=1e-6)
    assert calls == [6]  # both halves in one batched call
  calls.clear()
  np.testing.assert_array_equal(sampling.guided(counted, labels, 1.0, one_call=True)(x, t), cond)
  assert calls == [3]  # w = 1: the conditional half alone


def test_guided_sampling_in_the_scan():
  key, shape = jax.random.key(5), (4, 3, 3, 1)
  labels = jnp.array([0, 1, 2, 1])
  kw = dict(method="ddim", num_steps=8, eta=1.0)
  # w = 1 is the plain conditional model.
  conditional = sample(lambda x, t: labelled_model(x, t, labels), SCHED, key, shape, **kw)
  np.testing.assert_array_equal(sample(labelled_model, SCHED, key, shape, labels=labels, **kw), conditional)
  # w = 0 is the unconditional model; w = 3 lies beyond the conditional one, away from the unconditional one.
  uncond = sample(lambda x, t: labelled_model(x, t, jnp.full(4, -1)), SCHED, key, shape, **kw)
  np.testing.assert_allclose(sample(labelled_model, SCHED, key, shape, labels=labels, guidance_scale=0.0, **kw),
                             uncond, rtol=1e-6, atol=1e-6)
  strong = sample(labelled_model, SCHED, key, shape, labels=labels, guidance_scale=3.0, **kw)
  assert np.abs(np.asarray(strong) - np.asarray(conditional)).max() > 1e-3
  # Sample i depends on (key, i, label i) alone: changing label 1 leaves samples 0, 2 and 3 as they were.
  other = sample(labelled_model, SCHED, key, shape, labels=labels.at[1].set(2), guidance_scale=3.0, **kw)
  np.testing.assert_array_equal(np.asarray(other)[[0, 2, 3]], np.asarray(strong)[[0, 2, 3]])
  assert np.abs(np.asarray(other)[1] - np.asarray(strong)[1]).max() > 1e-3
  # The generator passes labels and the scale through, whatever its batch size.
  model = lambda p, x, t, labels: p * labelled_model(x, t, labels)
  options = SamplerOptions(guidance_scale=3.0, **kw)
  direct = sample(functools.partial(model, 1.0), SCHED, key, (7, 3, 3, 1), labels=jnp.arange(7) % 3,
                  guidance_scale=3.0, **kw)
  got = make_generator(model, SCHED, (3, 3, 1), options, batch_size=3)(1.0, key, 7, labels=np.arange(7) % 3)
  np.testing.assert_allclose(got, direct, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"guidance_scale=-1.0 is invalid"):
    sample(labelled_model, SCHED, key, shape, labels=labels, guidance_scale=-1.0, **kw)
  with pytest.raises(ValueError, match=r"labels have shape \(3,\), expected \(4,\)"):
    sample(labelled_model, SCHED, key, shape, labels=labels[:3], **kw)


# ---- DDPM on respaced steps (Improved DDPM) and learned variances ----

def improved_ddpm_steps(T_, n):
  """Improved DDPM's space_timesteps(T, [n]): a float stride (T - 1) / (n - 1) from 0, each point rounded."""
  stride, cur, out = ((T_ - 1) / (n - 1) if n > 1 else 1), 0.0, []
  for _ in range(n):
    out.append(round(cur))
    cur += stride
  return out


def test_ddpm_linspace_is_improved_ddpms_even_spacing_and_leading_its_ddim_stride():
  for T_, n in [(1000, 1000), (1000, 250), (1000, 100), (1000, 50), (1000, 10), (1000, 7), (4000, 33), (37, 6)]:
    assert sorted(timesteps("ddpm", T_, n, "linspace").tolist()) == improved_ddpm_steps(T_, n), (T_, n)
  for n in (250, 100, 50, 10):  # "ddimN": the stride i whose range(0, T, i) has n points
    assert sorted(timesteps("ddpm", 1000, n, "leading").tolist()) == list(range(0, 1000, 1000 // n))


def respaced_reference(betas, ts):
  """Improved DDPM's respacing in float64: β'_i = 1 - ᾱ_{t_i} / ᾱ_{t_(i-1)} over the sorted kept timesteps, and the
  posterior variance of the new chain."""
  abar, new, last = np.cumprod(1 - betas), [], 1.0
  for t in np.sort(ts):
    new.append(1 - abar[t] / last)
    last = abar[t]
  new = np.array(new)
  ab = np.cumprod(1 - new)
  ab_prev = np.append(1.0, ab[:-1])
  return new, ab, new * (1 - ab_prev) / (1 - ab)


@pytest.mark.parametrize("name, n, spacing", [("cosine", 100, "linspace"), ("cosine", 50, "leading"),
                                              ("linear", 7, "trailing")])
def test_respaced_schedule_matches_a_float64_reference(name, n, spacing):
  ts = timesteps("ddpm", 1000, n, spacing)
  betas, abar, post = respaced_reference(make_betas(name, 1000), ts)
  got = sampling.respaced_schedule(make_schedule(name, 1000), ts)
  # The float32 arrays: ~6e-8 relative each, and the betas the respacing starts from carry that much too.
  np.testing.assert_allclose(got.betas, betas, rtol=2e-6)
  np.testing.assert_allclose(got.alphas_cumprod, abar, rtol=2e-6)
  np.testing.assert_allclose(got.posterior_variance[1:], post[1:], rtol=2e-6)
  np.testing.assert_allclose(got.posterior_log_variance_clipped, np.log(np.append(post[1], post[1:])), atol=2e-6)


def test_respaced_ddpm_with_a_learned_variance_matches_a_hand_computed_chain():
  T_, n = 20, 6
  sched = make_schedule("linear", T_, 0.01, 0.2)
  ts = timesteps("ddpm", T_, n, "linspace")
  betas, abar, post = respaced_reference(np.linspace(0.01, 0.2, T_), ts)
  model = lambda x, t: jnp.concatenate([0.5 * x + 0.01 * t.reshape(-1, 1, 1, 1), jnp.tanh(x)], axis=-1)
  key = jax.random.key(3)
  x_T = np.asarray(jax.random.normal(jax.random.key(9), (3, 2, 2, 1)), np.float64)
  got = sample(model, sched, key, x_T.shape, method="ddpm", num_steps=n, timestep_spacing="linspace",
               x_T=jnp.asarray(x_T, jnp.float32), clip_x0=False)
  keys = diffusion.example_keys(key, 3)
  x = x_T
  for i, (pos, t) in enumerate(zip(range(n - 1, -1, -1), ts)):  # the model sees the original t
    ab, ab_prev = abar[pos], (abar[pos - 1] if pos > 0 else 1.0)
    x0 = (x - np.sqrt(1 - ab) * (0.5 * x + 0.01 * t)) / np.sqrt(ab)
    mean = (betas[pos] * np.sqrt(ab_prev) * x0 + (1 - ab_prev) * np.sqrt(1 - betas[pos]) * x) / (1 - ab)
    frac = (np.tanh(x) + 1) / 2
    log_var = frac * np.log(betas[pos]) + (1 - frac) * np.log(post[max(pos, 1)])
    z = np.asarray(sampling._normal(keys, i + 1, x.shape[1:]), np.float64)
    x = mean + (np.exp(0.5 * log_var) * z if pos > 0 else 0.0)
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)


def with_v(fn, value):
  """fn with a learned variance: its output, then v = value everywhere."""
  return lambda x, t: jnp.concatenate([fn(x, t), jnp.full_like(x, value)], axis=-1)


def test_learned_variance_at_its_ends_samples_as_the_fixed_ones_and_ddim_dpm_ignore_it():
  key, shape = jax.random.key(4), (3, 2, 2, 1)
  draw = lambda fn, **kw: np.asarray(sample(fn, SCHED, key, shape, **kw))
  for steps in (None, 50):  # all 1000 steps, and respaced
    kw = dict(method="ddpm", num_steps=steps, timestep_spacing="linspace")
    np.testing.assert_array_equal(draw(with_v(analytic_eps, -1.0), **kw), draw(analytic_eps, variance="fixed_small",
                                                                                 **kw))
    np.testing.assert_array_equal(draw(with_v(analytic_eps, 1.0), **kw), draw(analytic_eps, variance="fixed_large",
                                                                                **kw))
  for method in ("ddim", "dpmpp_2m"):
    np.testing.assert_array_equal(draw(with_v(analytic_eps, 0.3), method=method, num_steps=5),
                                  draw(analytic_eps, method=method, num_steps=5))


def test_guidance_combines_the_prediction_and_keeps_the_conditional_variance():
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  t, labels = jnp.array([10, 20, 30]), jnp.array([0, 1, 2])
  model = lambda x, t, y: jnp.concatenate([labelled_model(x, t, y), jnp.tanh(labelled_model(x, t, y))], axis=-1)
  got = np.asarray(sampling.guided(model, labels, 2.5, one_call=False)(x, t), np.float64)
  cond, uncond = (np.asarray(labelled_model(x, t, y), np.float64) for y in (labels, jnp.full(3, -1)))
  np.testing.assert_allclose(got[..., :1], uncond + 2.5 * (cond - uncond), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[..., 1:], np.tanh(cond), rtol=1e-6, atol=1e-6)
