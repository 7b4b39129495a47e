"""The variational bound in bits per dimension against float64 NumPy / SciPy references, closed forms and oracles."""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ddpm_jax import likelihood
from ddpm_jax.schedule import make_betas, schedule_from_betas
from helpers import ROOT, run_python


T = 40  # few timesteps keep the scans short; beta_end 0.3 still drives ᾱ_T to 0.005, so the prior is small
BETAS = make_betas("linear", T, 1e-4, 0.3)  # float64
SCHED = schedule_from_betas(BETAS)
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
POST_VAR = BETAS * (1 - ABAR_PREV) / (1 - ABAR)
SHAPE = (6, 4, 4, 2)


def grid_images(rng, shape=SHAPE):
  """8-bit images scaled to [-1, 1], with both edge values present."""
  k = rng.integers(0, 256, size=shape)
  k.flat[0], k.flat[1] = 0, 255
  return k / 127.5 - 1.0


# ---- float64 references, written from the formulas (nothing from ddpm_jax but the betas) ----

def ref_kl(m1, v1, m2, v2):
  """KL(N(m1, v1) || N(m2, v2)) in nats, variances given."""
  return np.log(np.sqrt(v2) / np.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def ref_decoder_logp(x, mean, var):
  """log P(bin of x) under N(mean, var) from SciPy's float64 log-CDFs; the edge bins extend to ±infinity."""
  sd = np.sqrt(var)
  upper = np.where(x > 0.999, np.inf, x + 1 / 255)
  lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
  # log(F(b) - F(a)) = log F(b) + log(1 - F(a) / F(b)), with F the CDF or, above the mean, the survival function
  # (each keeps full relative precision in its own tail).
  above = lower > mean
  log_b = np.where(above, stats.norm.logsf(lower, mean, sd), stats.norm.logcdf(upper, mean, sd))
  log_a = np.where(above, stats.norm.logsf(upper, mean, sd), stats.norm.logcdf(lower, mean, sd))
  return log_b + np.log(-np.expm1(log_a - log_b))


def ref_x0(x_t, t, out, prediction):
  """x̂0 implied by a model output, float64."""
  a, s = np.sqrt(ABAR[t]), np.sqrt(1 - ABAR[t])
  a, s = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
  return {"eps": (x_t - s * out) / a, "v": a * x_t - s * out, "x0": out}[prediction]


def ref_log_var(t, variance, v=None):
  """log σ_t² of p, float64, shaped [B, 1, 1, 1] (or v's shape)."""
  small = np.log(np.append(POST_VAR[1], POST_VAR[1:]))[t].reshape(-1, 1, 1, 1)
  if variance == "fixed_small":
    return small
  if variance == "fixed_large":
    return np.log(np.append(POST_VAR[1], BETAS[1:]))[t].reshape(-1, 1, 1, 1)
  frac = (v + 1) / 2
  return frac * np.log(BETAS)[t].reshape(-1, 1, 1, 1) + (1 - frac) * small


def ref_term(x0, x_t, t, out, variance, prediction, clip=True):
  """[B] bits of the bound's term at t: the decoder at t = 0, else the KL to the posterior."""
  c = x0.shape[-1]
  pred, v = (out[..., :c], out[..., c:]) if out.shape[-1] == 2 * c else (out, None)
  x0_hat = ref_x0(x_t, t, pred, prediction)
  if clip:
    x0_hat = np.clip(x0_hat, -1, 1)
  c1 = (BETAS * np.sqrt(ABAR_PREV) / (1 - ABAR))[t].reshape(-1, 1, 1, 1)
  c2 = ((1 - ABAR_PREV) * np.sqrt(1 - BETAS) / (1 - ABAR))[t].reshape(-1, 1, 1, 1)
  model_var = np.exp(ref_log_var(t, variance, v)) * np.ones_like(x0)
  model_mean = c1 * x0_hat + c2 * x_t
  true_var = np.append(POST_VAR[1], POST_VAR[1:])[t].reshape(-1, 1, 1, 1)
  kl = ref_kl(c1 * x0 + c2 * x_t, true_var, model_mean, model_var).reshape(len(t), -1).mean(1) / np.log(2)
  nll = -ref_decoder_logp(x0, model_mean, model_var).reshape(len(t), -1).mean(1) / np.log(2)
  return np.where(t == 0, nll, kl)


def ref_prior(x0):
  """[B] bits of KL(q(x_T | x0) || N(0, I))."""
  return ref_kl(np.sqrt(ABAR[-1]) * x0, 1 - ABAR[-1], 0.0, 1.0).reshape(len(x0), -1).mean(1) / np.log(2)


# ---- each term on random inputs ----

def test_normal_kl_matches_the_closed_form_on_random_inputs():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 1000))
  lv1, lv2 = rng.uniform(-8, 2, size=(2, 1000))
  got = likelihood.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
  want = ref_kl(m1, np.exp(lv1), m2, np.exp(lv2))
  # float32 arithmetic on terms of size up to e^10: relative 1e-5 of the larger of the KL and 1.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_discretized_gaussian_matches_scipy_with_open_edges_and_sums_to_one():
  rng = np.random.default_rng(1)
  x = grid_images(rng, (4000,))
  mean = x + rng.normal(0, 0.05, size=x.shape) * rng.choice([0.1, 1, 10], size=x.shape)
  log_var = rng.uniform(np.log(1e-6), np.log(1.0), size=x.shape)
  x, mean, log_var = (a.astype(np.float32) for a in (x, mean, log_var))  # the reference sees the same inputs
  got = jax.jit(likelihood.discretized_gaussian_log_likelihood)(x, mean, log_var)
  want = ref_decoder_logp(*(a.astype(np.float64) for a in (x, mean, np.exp(log_var.astype(np.float64)))))
  assert want.min() < -1000 and want.max() > -1e-3  # far tails and near-certain bins both occur
  # float32 arithmetic: the standardised bin ends carry a relative error ~1e-7, and log p is about -z² / 2 for a
  # bin end z standard deviations out, so its relative error stays ~2e-7; near-certain bins need an absolute bound.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # The 256 bins of one value's distribution cover the line: their probabilities sum to 1 (for wide and narrow σ,
  # centred inside and outside [-1, 1]).
  mean, sd = np.array([[0.0, 0.5], [0.9, 0.01], [-1.3, 0.2], [0.37, 1e-3], [2.0, 3.0]], np.float32).T[..., None]
  grid = np.arange(256, dtype=np.float32) / 127.5 - 1.0
  p = np.exp(np.asarray(likelihood.discretized_gaussian_log_likelihood(grid, mean, np.log(sd**2)), np.float64))
  np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)  # float32 masses, each rounded by ~6e-8


def test_prior_term_matches_the_closed_form():
  x0 = grid_images(np.random.default_rng(2))
  np.testing.assert_allclose(np.asarray(likelihood.prior_bits(SCHED, jnp.asarray(x0, jnp.float32))), ref_prior(x0),
                             rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_vb_terms_match_a_float64_reference_on_random_inputs(variance, prediction):
  rng = np.random.default_rng(3)
  x0 = grid_images(rng)
  t = np.array([0, 0, 1, 7, 20, T - 1])  # the decoder twice (one edge-heavy image), KLs early, middle and last
  x_t = np.sqrt(ABAR[t]).reshape(-1, 1, 1, 1) * x0 + np.sqrt(1 - ABAR[t]).reshape(-1, 1, 1, 1) * rng.normal(size=SHAPE)
  out = rng.normal(size=SHAPE[:-1] + (SHAPE[-1] * (2 if variance == "learned_range" else 1),))
  if variance == "learned_range":
    out[..., SHAPE[-1]:] = rng.uniform(-1, 1, size=SHAPE)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = likelihood.vb_terms(SCHED, f32(x0), f32(x_t), jnp.asarray(t), f32(out), variance=variance,
                            prediction=prediction)
  # float32: ~1e-6 relative on the terms (some are ~1e3 bits where a random output lies far from the posterior).
  np.testing.assert_allclose(np.asarray(got), ref_term(x0, x_t, t, out, variance, prediction), rtol=2e-5, atol=1e-5)


# ---- the whole bound with an oracle model ----

def oracle(x0, prediction="eps"):
  """The model that knows x0: the exact ε (or v, or x0) of any x_t = q_sample(x0, t, ε)."""
  x0 = jnp.asarray(x0, jnp.float32)

  def fn(x_t, t):
    a = jnp.sqrt(jnp.asarray(ABAR, jnp.float32))[t].reshape(-1, 1, 1, 1)
    s = jnp.sqrt(jnp.asarray(1 - ABAR, jnp.float32))[t].reshape(-1, 1, 1, 1)
    eps = (x_t - a * x0) / s
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]
  return fn


def exact_decoder_bits(x0):
  """[B] bits of the decoder whose mean is x0 itself and whose variance is β̃_1 (the oracle at t = 0)."""
  return -ref_decoder_logp(x0, x0, POST_VAR[1]).reshape(len(x0), -1).mean(1) / np.log(2)


def with_v(fn, value):
  """A model of twice the channels: fn's output, then v = value everywhere."""
  return lambda x, t: jnp.concatenate([fn(x, t), jnp.full_like(x, value)], axis=-1)


X0 = grid_images(np.random.default_rng(4))
LABELS = jnp.array([0, 1, 0, 1, 0, 1])


def labelled(x, t, y):
  """The oracle for label 0, off by 0.5 in ε for label 1."""
  return oracle(X0)(x, t) + 0.5 * y.reshape(-1, 1, 1, 1)


noisy = lambda x, t: oracle(X0)(x, t) + 0.3 * jnp.sin(3.0 * x)  # a model with errors: its KLs are not 0
BOUNDS = {  # name: (model, keyword arguments of bits_per_dim)
    "small": (oracle(X0), dict(variance="fixed_small")),
    **{f"large_{p}": (oracle(X0, p), dict(variance="fixed_large", prediction=p)) for p in ("eps", "v", "x0")},
    "noisy_small": (noisy, dict(variance="fixed_small")),
    "noisy_large": (noisy, dict(variance="fixed_large")),
    "noisy_low": (with_v(noisy, -1.0), dict(variance="learned_range")),
    "noisy_high": (with_v(noisy, 1.0), dict(variance="learned_range")),
    "labelled": (labelled, dict(variance="fixed_small", labels=LABELS)),
}


@pytest.fixture(scope="module")
def bounds():
  """Every bound of BOUNDS, compiled as one program (one compilation keeps the file fast), as float64 arrays."""
  run = jax.jit(lambda x, key: {name: likelihood.bits_per_dim(fn, SCHED, x, key, **kw)
                                for name, (fn, kw) in BOUNDS.items()})
  out = run(jnp.asarray(X0, jnp.float32), jax.random.key(0))
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out)


def test_the_oracle_has_kl_terms_of_zero_under_fixed_small(bounds):
  got = bounds["small"]
  assert got["terms"].shape == (len(X0), T) and got["total"].shape == got["prior"].shape == (len(X0),)
  # Equal means and variances: each KL is 0 up to float32 rounding of the means (1e-6 of the step's noise scale).
  assert np.abs(got["terms"][:, 1:]).max() < 1e-5
  np.testing.assert_allclose(got["terms"][:, 0], exact_decoder_bits(X0), rtol=1e-4)
  np.testing.assert_allclose(got["prior"], ref_prior(X0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(got["total"], got["terms"].sum(1) + got["prior"], rtol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_the_oracle_under_fixed_large_pays_the_kl_between_the_two_variances(bounds, prediction):
  got = bounds[f"large_{prediction}"]
  t = np.arange(1, T)
  # The same means: KL(N(μ, β̃_t) || N(μ, β_t)) = (log(β_t / β̃_t) - 1 + β̃_t / β_t) / 2, per dimension.
  want = 0.5 * (np.log(BETAS[t] / POST_VAR[t]) - 1 + POST_VAR[t] / BETAS[t]) / np.log(2)
  np.testing.assert_allclose(got["terms"][:, 1:], np.broadcast_to(want, (len(X0), T - 1)), rtol=1e-4, atol=2e-6)
  # At t = 0 the decoder keeps β̃_1 (the original code's choice), so it equals fixed_small's.
  np.testing.assert_allclose(got["terms"][:, 0], exact_decoder_bits(X0), rtol=1e-4)


def test_learned_range_at_the_ends_equals_the_fixed_variances_term_by_term(bounds):
  small, low = bounds["noisy_small"], bounds["noisy_low"]
  assert small["terms"][:, 1:].min() > 1e-4
  for key in ("total", "prior", "terms"):
    np.testing.assert_allclose(low[key], small[key], rtol=1e-5, atol=1e-7)
  # v = +1 is β_t: fixed_large for t >= 1 (at t = 0 fixed_large keeps β̃_1 and learned_range takes β_0).
  np.testing.assert_allclose(bounds["noisy_high"]["terms"][:, 1:], bounds["noisy_large"]["terms"][:, 1:],
                             rtol=1e-5, atol=1e-7)


def test_labels_reach_the_model(bounds):
  kl = bounds["labelled"]["terms"][:, 1:].sum(1)
  assert np.abs(kl[::2]).max() < 1e-4 and kl[1::2].min() > 0.1


def test_variance_and_output_channels_must_agree():
  x0, key = jnp.asarray(X0, jnp.float32), jax.random.key(0)
  with pytest.raises(ValueError, match="variance='learned_range' needs the model's v"):
    jax.eval_shape(lambda x: likelihood.bits_per_dim(oracle(X0), SCHED, x, key, variance="learned_range"), x0)
  with pytest.raises(ValueError, match="variance='fixed_large' takes no v"):
    jax.eval_shape(lambda x: likelihood.bits_per_dim(with_v(oracle(X0), 0.0), SCHED, x, key), x0)
  with pytest.raises(ValueError, match="variance='learned' is unknown: choose one of fixed_small, fixed_large, "
                                       "learned_range"):
    jax.eval_shape(lambda x: likelihood.bits_per_dim(oracle(X0), SCHED, x, key, variance="learned"), x0)


def test_the_evaluator_pads_the_last_batch_without_changing_an_image_and_reports_progress():
  model = lambda params, x, t: params * x  # (params, x_t, t): the evaluator's model convention
  calls = []
  evaluate = likelihood.make_bound_evaluator(model, SCHED, variance="fixed_small", batch_size=2)
  key, x0 = jax.random.key(3), jnp.asarray(X0[:5], jnp.float32)
  got = evaluate(0.5, np.asarray(x0), key, progress=lambda done, total: calls.append((done, total)))
  assert calls == [(2, 5), (4, 5), (5, 5)] and got["terms"].shape == (5, T)
  # Image i's noise comes from (key, i): the padded last batch gives image 4 what it gets alone.
  for rows in [slice(0, 2), slice(4, 5)]:
    want = likelihood.bits_per_dim(lambda x, t: 0.5 * x, SCHED, x0[rows], key, variance="fixed_small",
                                   index_offset=rows.start)
    np.testing.assert_allclose(got["total"][rows], want["total"], rtol=1e-6)
  summary = likelihood.summarize(got)
  total = np.asarray(got["total"], np.float64)
  assert summary["bits_per_dim"] == pytest.approx(total.mean(), rel=1e-12)
  assert summary["standard_error"] == pytest.approx(total.std(ddof=1) / np.sqrt(5), rel=1e-12)
  assert summary["decoder"] + summary["kl_terms"] + summary["prior"] == pytest.approx(summary["bits_per_dim"],
                                                                                      rel=1e-6)


SPLIT_OVER_TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from ddpm_jax import likelihood
    from ddpm_jax.schedule import make_betas, schedule_from_betas
    assert jax.device_count() == 2
    schedule = schedule_from_betas(make_betas("linear", 40, 1e-4, 0.3))
    x0 = (np.random.default_rng(0).integers(0, 256, (5, 4, 4, 2)) / 127.5 - 1).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0], np.int32)

    def model(p, x, t, y=None):  # (params, x_t, t[, labels]): each image its own t and, with labels, its label
      out = p * x + 0.01 * t[:, None, None, None]
      return out if y is None else out + 0.1 * y[:, None, None, None]

    found, calls = {}, []
    two = likelihood.make_bound_evaluator(model, schedule, variance="fixed_small", batch_size=3)
    one = likelihood.make_bound_evaluator(model, schedule, variance="fixed_small", batch_size=5,
                                          devices=jax.devices()[:1])
    found["batch_sizes"] = [two.batch_size, one.batch_size]
    for name, y in (("", None), ("labelled_", labels)):
      got = two(0.5, x0, jax.random.key(3), y, progress=lambda done, total: calls.append((done, total)))
      want = one(0.5, x0, jax.random.key(3), y)
      found.update({f"{name}got_{k}": v for k, v in got.items()})
      found.update({f"{name}want_{k}": v for k, v in want.items()})
    np.savez(sys.argv[1], calls=calls, **found)
""")


def test_the_evaluator_splits_each_batch_over_the_devices_and_an_image_s_bound_does_not_depend_on_them(tmp_path):
  out = run_python("-c", SPLIT_OVER_TWO_DEVICES, tmp_path / "bounds.npz", devices=2, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  found = np.load(tmp_path / "bounds.npz")
  # batch_size 3 rounds up to 4 over 2 devices: two batches, the second padded (without and with labels)
  assert found["batch_sizes"].tolist() == [4, 5] and found["calls"].tolist() == [[4, 5], [5, 5]] * 2
  for name in ("", "labelled_"):
    for k in ("total", "prior", "terms"):
      # image i's noise comes from (key, i) on 2 devices in batches of 4 and on 1 in one batch of 5: equal but for
      # the rounding of how XLA fuses each program (a mean of 32 float32 values per term)
      np.testing.assert_allclose(found[f"{name}got_{k}"], found[f"{name}want_{k}"], rtol=1e-6)
  # the labels reach the model: they change the bound
  assert np.abs(found["labelled_got_total"] - found["got_total"]).max() > 1e-3


@pytest.mark.numerics
def test_the_training_run_logs_the_bound_at_its_eval_steps(tmp_path, capsys):
  from configs import default  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top
  from ddpm_jax.train_state import init_params  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model.base_channels, config.model.channel_mult = 8, (1, 2)
  config.diffusion.num_timesteps, config.eval_every_steps, config.eval.nll_num_images = T, 7, 6
  config.sample.batch_size = 4
  (hook,) = [h for h in builders.build_training(config, str(tmp_path)).hooks if h.name == "nll"]
  assert hook.every == 7
  # Random parameters of the model's shapes (initialising them for real compiles a large program).
  shapes = jax.eval_shape(lambda: init_params(builders.build_model(config), jax.random.key(0), (1, 8, 8, 1)))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
  logged = []
  writer = type("Writer", (), {"write": lambda self, step, scalars: logged.append((step, scalars))})()
  hook.run(7, params, None)  # processes other than 0 compute nothing
  assert not logged and not capsys.readouterr().out
  hook.run(7, params, writer)
  ((step, scalars),) = logged
  assert step == 7 and set(scalars) == {"eval/bits_per_dim", "eval/bits_per_dim_se", "eval/bits_per_dim_prior",
                                        "eval/bits_per_dim_decoder", "eval/bits_per_dim_kl"}
  parts = scalars["eval/bits_per_dim_prior"] + scalars["eval/bits_per_dim_decoder"] + scalars["eval/bits_per_dim_kl"]
  assert scalars["eval/bits_per_dim"] == pytest.approx(parts, rel=1e-6) and scalars["eval/bits_per_dim_se"] > 0
  assert re.match(r"nll at step 7: bits/dim: \d+\.\d{4} ± \d+\.\d{4} over 6 images \(.*; the training images of "
                  r"digits, which has no test split\)$", capsys.readouterr().out.strip())
