"""The forward process, conversions, prediction targets, loss weights and losses against closed forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as d
from ddpm_jax.schedule import make_schedule


SCHED = make_schedule("linear", 1000)


def _abar64(t):
  return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t]


@pytest.mark.optimized  # 1,000 steps of a large batch
def test_iterated_q_step_matches_q_sample_distribution():
  # 200,000 draws per pixel value: the sample mean has s.e. <= sqrt(1/n) = 0.0022
  # and the sample variance s.e. <= var*sqrt(2/n) = 0.0032; we allow 5 s.e.
  n, steps = 200_000, 300
  x0 = jnp.tile(jnp.array([-1.0, 0.25, 0.9]), (n, 1))

  def body(i, carry):
    x, key = carry
    key, sub = jax.random.split(key)
    return d.q_step(SCHED, x, jnp.full((n,), i), jax.random.normal(sub, x.shape)), key

  x_iter, _ = jax.jit(lambda k: jax.lax.fori_loop(0, steps, body, (x0, k)))(jax.random.key(0))
  t = steps - 1  # `steps` forward steps land on 0-based index steps - 1
  x_closed = d.q_sample(SCHED, x0, jnp.full((n,), t), jax.random.normal(jax.random.key(1), x0.shape))
  abar = _abar64(t)
  for x in (np.asarray(x_iter, np.float64), np.asarray(x_closed, np.float64)):
    np.testing.assert_allclose(x.mean(0), np.sqrt(abar) * np.array([-1.0, 0.25, 0.9]), atol=5 * 0.0022)
    np.testing.assert_allclose(x.var(0), np.full(3, 1 - abar), atol=5 * 0.0032)


@pytest.fixture
def batch():
  k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
  x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 10, 500, 998, 999])
  return x0, noise, t


def test_predict_x0_inverts_q_sample(batch):
  x0, noise, t = batch
  x_t = d.q_sample(SCHED, x0, t, noise)
  # |x_t| <= ~5 and 1/sqrt(ᾱ_999) ≈ 156: float32 rounding of x_t (6e-8 relative) is
  # amplified to at most ~5 * 156 * 1.2e-7 ≈ 1e-4 in x0; eps has no amplification.
  np.testing.assert_allclose(d.predict_x0_from_eps(SCHED, x_t, t, noise), x0, atol=2e-4)
  np.testing.assert_allclose(d.predict_x0_from_eps(SCHED, x_t, t, noise)[:4], x0[:4], atol=1e-5)
  np.testing.assert_allclose(d.predict_eps_from_x0(SCHED, x_t, t, x0)[1:], noise[1:], atol=1e-4)


def test_v_parameterisation_round_trips(batch):
  x0, noise, t = batch
  x_t = d.q_sample(SCHED, x0, t, noise)
  v = d.get_v(SCHED, x0, t, noise)
  np.testing.assert_allclose(d.predict_x0_from_v(SCHED, x_t, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(d.predict_eps_from_v(SCHED, x_t, t, v), noise, atol=1e-5)


@pytest.mark.parametrize("prediction", d.PREDICTIONS)
def test_prediction_target_and_split_prediction_round_trip(prediction, batch):
  x0, noise, t = batch
  x_t = d.q_sample(SCHED, x0, t, noise)
  ab = _abar64(np.asarray(t)).reshape(-1, 1, 1, 1)
  x0_64, noise_64 = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  want = {"eps": noise_64, "v": np.sqrt(ab) * noise_64 - np.sqrt(1 - ab) * x0_64, "x0": x0_64}[prediction]
  target = d.prediction_target(SCHED, x0, t, noise, prediction)
  np.testing.assert_allclose(target, want, rtol=1e-6, atol=1e-6)  # float32 rounding of the coefficients only
  x0_hat, eps_hat = d.split_prediction(SCHED, x_t, t, target, prediction)
  # x̂0 from ε at t = 999 amplifies x_t's float32 rounding by 1/sqrt(ᾱ) ≈ 156 (see above), ε̂ from x0 at t = 0
  # by 1/sqrt(1 - ᾱ) = 100: 2e-4 bounds both. Away from those ends (x̂0 for t <= 500, ε̂ for t >= 10) the
  # amplification is below 4 and 1e-5 holds.
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
  np.testing.assert_allclose(x0_hat[:4], x0[:4], atol=1e-5)
  np.testing.assert_allclose(eps_hat[2:], noise[2:], atol=1e-5)
  # The output is the model's own estimate, not recomputed: whichever part it is comes back bit-exact.
  if prediction != "v":
    np.testing.assert_array_equal({"eps": eps_hat, "x0": x0_hat}[prediction], target)


def test_min_snr_weights_against_numpy():
  t = np.array([0, 1, 50, 100, 150, 200, 500, 999])
  abar = _abar64(t)
  snr = abar / (1 - abar)
  for gamma in (5.0, 1.0):
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clamp
    want = {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1), "x0": np.minimum(snr, gamma)}
    for prediction in d.PREDICTIONS:
      for loss, power in (("l2", 1.0), ("l1", 0.5)):
        got = d.loss_weights(SCHED, jnp.asarray(t), prediction=prediction, weighting="min_snr", loss=loss,
                             min_snr_gamma=gamma)
        assert got.dtype == jnp.float32 and got.shape == t.shape
        # SNR comes from the float32 sqrt(1/ᾱ - 1), itself rounded from float64: ~3e-7 relative.
        np.testing.assert_allclose(got, want[prediction] ** power, rtol=2e-6, err_msg=f"{prediction} {loss} {gamma}")
  np.testing.assert_allclose(d.snr(SCHED, jnp.asarray(t)), snr, rtol=2e-6)
  for prediction in d.PREDICTIONS:
    np.testing.assert_array_equal(d.loss_weights(SCHED, jnp.asarray(t), prediction=prediction, weighting="none",
                                                 loss="l1"), np.ones(len(t), np.float32))
  jitted = jax.jit(functools.partial(d.loss_weights, SCHED, prediction="v", weighting="min_snr", loss="l2"))
  np.testing.assert_allclose(jitted(jnp.asarray(t), min_snr_gamma=jnp.float32(5.0)), np.minimum(snr, 5.0) / (snr + 1),
                             rtol=2e-6)  # γ may be a traced array


def test_min_snr_under_l1_weights_the_x0_error_by_sqrt_min_snr_gamma_in_every_parameterisation():
  # One x0 error e, written as the ε, v and x0 errors it implies at each t (float64, by hand from
  # x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε held fixed): the weighted l1 loss is sqrt(min(SNR, γ)) · mean|e| for all three.
  t = np.array([0, 10, 100, 300, 600, 999])
  abar = _abar64(t)
  snr, gamma = abar / (1 - abar), 5.0
  assert (snr > gamma).any() and (snr < gamma).any()
  rng = np.random.default_rng(0)
  x0, x0_hat, eps = rng.normal(size=(3, len(t), 4, 4, 1))
  a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
  x_t = a * x0 + s * eps
  eps_hat = (x_t - a * x0_hat) / s
  v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
  want = np.mean(np.sqrt(np.minimum(snr, gamma)) * np.abs(x0 - x0_hat).reshape(len(t), -1).mean(axis=1))
  for prediction, (pred, target) in {"eps": (eps_hat, eps), "v": (v_hat, v), "x0": (x0_hat, x0)}.items():
    w = d.loss_weights(SCHED, jnp.asarray(t), prediction=prediction, weighting="min_snr", loss="l1",
                       min_snr_gamma=gamma)
    got = d.loss_fn(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), "l1", w)
    # float32 inputs and weights (relative rounding ~1e-7 each; ε̂ at t=0 carries x0's error times sqrt(SNR) ≈ 100,
    # rounded to float32 relative to its own size): 1e-5 relative.
    assert float(got) == pytest.approx(want, rel=1e-5), prediction


def test_prediction_helpers_reject_bad_names():
  x, t = jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="^prediction='score' is unknown: choose one of eps, v, x0$"):
    d.split_prediction(SCHED, x, t, x, "score")
  with pytest.raises(ValueError, match="^prediction='score' is unknown: choose one of eps, v, x0$"):
    d.prediction_target(SCHED, x, t, x, "score")
  with pytest.raises(ValueError, match="^loss_weighting='snr' is unknown: choose one of none, min_snr$"):
    d.loss_weights(SCHED, t, prediction="eps", weighting="snr", loss="l1")
  with pytest.raises(ValueError, match="^min_snr_gamma=0.0 is invalid: it must be positive$"):
    d.loss_weights(SCHED, t, prediction="eps", weighting="min_snr", loss="l1", min_snr_gamma=0.0)


def test_posterior_matches_closed_form(batch):
  x0, noise, t = batch
  x_t = d.q_sample(SCHED, x0, t, noise)
  mean, var, log_var = d.q_posterior_mean_variance(SCHED, x0, x_t, t)
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  abar_prev = np.r_[1.0, abar[:-1]]
  tt = np.asarray(t)
  shape = (-1, 1, 1, 1)
  # Bishop-style Gaussian conditioning of q(x_{t-1}|x0) with q(x_t|x_{t-1}) (DDPM eq. 7).
  want_var = ((1 - abar_prev[tt]) * betas[tt] / (1 - abar[tt])).reshape(shape)
  want_mean = (np.sqrt(abar_prev[tt]) * betas[tt] / (1 - abar[tt])).reshape(shape) * np.asarray(x0, np.float64) + (
      np.sqrt(1 - betas[tt]) * (1 - abar_prev[tt]) / (1 - abar[tt])).reshape(shape) * np.asarray(x_t, np.float64)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, np.broadcast_to(want_var, (6, 1, 1, 1)), rtol=1e-6)
  assert float(var[0].squeeze()) == 0.0 and np.isfinite(np.asarray(log_var)).all()
  # At t = 0 the posterior collapses onto x0.
  np.testing.assert_allclose(mean[0], x0[0], atol=1e-6)


FUNCS = {
    "q_step": d.q_step,
    "q_sample": d.q_sample,
    "predict_x0_from_eps": d.predict_x0_from_eps,
    "predict_eps_from_x0": d.predict_eps_from_x0,
    "get_v": d.get_v,
    "predict_x0_from_v": d.predict_x0_from_v,
    "predict_eps_from_v": d.predict_eps_from_v,
    "posterior_mean": lambda s, a, t, b: d.q_posterior_mean_variance(s, b, a, t)[0],
}


@pytest.mark.parametrize("name", FUNCS)
def test_jit_and_vmap_agree_with_eager(name, batch):
  x0, noise, t = batch
  x_t = d.q_sample(SCHED, x0, t, 0.5 * noise)
  fn = functools.partial(FUNCS[name], SCHED)
  eager = fn(x_t, t, noise)
  # XLA may fuse into FMAs: allow a few float32 ulps, never more.
  np.testing.assert_allclose(jax.jit(fn)(x_t, t, noise), eager, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(x_t, t, noise), eager, rtol=1e-6, atol=1e-6)


def test_scalar_t_broadcasts_over_the_batch(batch):
  x0, noise, _ = batch
  np.testing.assert_allclose(d.q_sample(SCHED, x0, 7, noise), d.q_sample(SCHED, x0, jnp.full(6, 7), noise))


def test_losses_against_numpy():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 5, 3, 3, 2)).astype(np.float32)
  w = rng.uniform(size=5).astype(np.float32)
  diff = pred.astype(np.float64) - target
  l1 = np.abs(diff).reshape(5, -1).mean(1)
  l2 = np.square(diff).reshape(5, -1).mean(1)
  np.testing.assert_allclose(d.loss_fn(pred, target), l1.mean(), rtol=1e-6)
  np.testing.assert_allclose(d.loss_fn(pred, target, "l2"), l2.mean(), rtol=1e-6)
  np.testing.assert_allclose(d.loss_fn(pred, target, "l1", w), (w * l1).mean(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(d.loss_fn, static_argnums=2)(pred, target, "l2"), l2.mean(), rtol=1e-6)


def test_loss_rejects_bad_arguments():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="^loss='huber' is unknown: choose one of l1, l2$"):
    d.loss_fn(x, x, "huber")
  with pytest.raises(ValueError, match=r"^pred shape \(2, 3\) does not match target shape \(3, 2\)$"):
    d.loss_fn(x, x.T)
