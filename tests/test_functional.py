"""The functional training API by value: EMA and its warmup, the learning-rate schedule, gradient accumulation,
the attention block and the timestep embedding against hand computations, a bf16 step, the README's loop."""

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import training
from ddpm_jax.schedule import make_schedule
from ddpm_jax.train_state import TrainState, create_train_state
from ddpm_jax.unet import AttentionBlock, timestep_embedding, unet_preset

from helpers import ROOT, SMALL_MODEL


README = ROOT / "README.md"


def _state(tx, params):
  """A TrainState of a model-free parameter tree."""
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                    apply_fn=None, tx=tx)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_each_update_with_its_decay_and_warmup(warmup):
  decay, lr = 0.9, 0.1
  state = _state(optax.sgd(lr), {"w": np.array([1.0, -2.0], np.float32)})
  p, e = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  for n in range(1, 6):
    g = np.array([0.5 * n, -1.0], np.float32)
    state = state.apply_gradients({"w": g}, ema_decay=decay, ema_warmup=warmup)
    p = p - lr * g
    d = min(decay, (1 + n) / (10 + n)) if warmup else decay  # n updates applied so far
    e = d * e + (1 - d) * p
    np.testing.assert_allclose(state.params["w"], p, rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], e, rtol=1e-6)
  assert int(state.step) == 5


@pytest.mark.parametrize("lr_schedule", ["cosine", "constant"])
def test_learning_rate_schedule_by_value(lr_schedule):
  peak, warmup, total = 2e-3, 10, 110
  sched = training.learning_rate_schedule(learning_rate=peak, total_steps=total, warmup_steps=warmup,
                                          lr_schedule=lr_schedule)
  for s in (0, 1, 5, 10, 11, 60, 109, 110):
    if s < warmup:
      want = peak * s / warmup
    elif lr_schedule == "constant":
      want = peak
    else:
      want = peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    # optax computes in float32: 1 + cos(·) carries an absolute error of about 2^-24 ≈ 6e-8, times peak / 2.
    assert float(sched(s)) == pytest.approx(want, rel=1e-6, abs=peak * 1e-7), s


@pytest.mark.numerics
def test_gradient_accumulation_equals_one_step_on_the_concatenated_batch_and_moves_the_ema_once():
  k = 4
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(k * 8, 3)).astype(np.float32), rng.normal(size=(k * 8,)).astype(np.float32)
  params = {"w": np.zeros(3, np.float32), "b": np.zeros((), np.float32)}
  grad = jax.jit(lambda p, xs, ys: jax.grad(lambda p: jnp.mean((xs @ p["w"] + p["b"] - ys) ** 2))(p))
  apply = jax.jit(lambda state, g: state.apply_gradients(g, ema_decay=0.5))
  kw = dict(learning_rate=0.05, total_steps=400, warmup_steps=0, lr_schedule="constant", grad_clip_norm=1.0)
  plain = _state(training.make_optimizer(**kw), params)
  accum = _state(training.make_optimizer(grad_accum_steps=k, **kw), params)
  for _ in range(3):  # three updates
    plain = apply(plain, grad(plain.params, x, y))
    for i in range(k):
      before = accum.ema_params
      accum = apply(accum, grad(accum.params, x[8 * i:8 * (i + 1)], y[8 * i:8 * (i + 1)]))
      if i < k - 1:  # no update applied yet: parameters and EMA stand still
        jax.tree_util.tree_map(np.testing.assert_array_equal, accum.ema_params, before)
    # The mean of k equal-sized micro-batch gradients is the full batch's gradient, up to float32 rounding.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), accum.params,
                           plain.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), accum.ema_params,
                           plain.ema_params)
  assert float(jnp.abs(plain.params["w"]).sum()) > 0.1  # the updates did move the parameters


@pytest.mark.numerics
def test_attention_block_matches_a_float64_hand_computation():
  block = AttentionBlock(num_heads=2, head_dim=3, norm="layer", qkv_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 2, 3, 4))  # 6 pixels, 4 channels
  params = block.init(jax.random.key(1), x)["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  with jax.default_matmul_precision("float32"):  # the math in float32: no TF32 / bf16 operands on a GPU or TPU
    got = block.apply({"params": params}, x)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  h = np.asarray(x, np.float64).reshape(2, 6, 4)
  ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6) * p["LayerNorm_0"]["scale"]
  qkv = (ln @ p["Dense_0"]["kernel"]).reshape(2, 6, 3, 2, 3)  # [b, pixel, q/k/v, head, dim]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(3)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 6, 6)
  want = h + out @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(np.asarray(got).reshape(2, 6, 4), want, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_the_formula():
  t = np.array([0, 1, 37, 999])
  got = np.asarray(timestep_embedding(jnp.asarray(t), 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)  # 4 frequencies from 1 down to 1/10000
  want = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  # float32 arguments up to 999 rad: sin/cos of a float32-rounded argument, error <= 999 · 2^-24 ≈ 6e-5.
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert got[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_bfloat16_train_step_keeps_float32_params_and_tracks_the_float32_loss():
  sched = make_schedule("cosine", 1000)
  batch = jax.random.uniform(jax.random.key(3), (8, 8, 8, 1), minval=-1, maxval=1)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    model = unet_preset("tiny", **SMALL_MODEL, attn_resolutions=(4,), dtype=dtype)
    tx = training.make_optimizer(learning_rate=1e-3, total_steps=10)
    state = create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 1))
    # The float32 reference in float32 throughout, also where matmuls would default to TF32 or bf16 passes.
    with jax.default_matmul_precision("float32") if dtype == "float32" else contextlib.nullcontext():
      new, metrics = jax.jit(functools.partial(training.train_step, schedule=sched))(state, batch, jax.random.key(4))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(new.params))
    losses[dtype] = float(metrics["loss"])
    assert np.isfinite(float(metrics["grad_norm"]))
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per operation); over the network's few
  # dozen operations the L1 loss stays within 2% of float32's.
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
  assert losses["bfloat16"] != losses["float32"]  # the step did compute in bfloat16


def readme_library_code() -> str:
  """The python block of the README's "Library use" section."""
  text = README.read_text(encoding="utf-8")
  section = text[text.index("## Library use"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.bitwise
def test_the_readme_loop_trains_samples_and_repeats_bit_for_bit():
  runs = []
  for _ in range(2):
    scope: dict = {}
    exec(compile(readme_library_code(), "README.md", "exec"), scope)  # pylint: disable=exec-used
    runs.append(scope)
  losses = np.asarray(runs[0]["losses"])
  # Predicting ε = 0 scores E|ε| = sqrt(2/π) = 0.80 under the L1 loss; the untrained net starts near it.
  assert losses[:10].mean() > 0.7 and losses[-50:].mean() < 0.5, (losses[:10].mean(), losses[-50:].mean())
  assert runs[0]["samples"].shape == (16, 8, 8, 1) and np.isfinite(runs[0]["samples"]).all()
  np.testing.assert_array_equal(runs[0]["losses"], runs[1]["losses"])
  np.testing.assert_array_equal(runs[0]["samples"], runs[1]["samples"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0]["state"].params, runs[1]["state"].params)


@pytest.mark.parametrize("prediction, weighting, loss", [("v", "min_snr", "l1"), ("x0", "none", "l2"),
                                                         ("x0", "min_snr", "l2"), ("eps", "min_snr", "l1")])
def test_train_step_loss_is_the_weighted_error_on_the_prediction_target(prediction, weighting, loss):
  sched = make_schedule("linear", 1000)
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  zero_model = lambda variables, x, t, train, rngs: 0.0 * x + variables["params"]["c"]  # predicts the constant c
  tx = optax.sgd(0.0)
  state = TrainState(step=jnp.asarray(3, jnp.int32), params={"c": jnp.float32(0.25)}, ema_params={"c": 0.25},
                     opt_state=tx.init({"c": jnp.float32(0.25)}), apply_fn=zero_model, tx=tx)
  x0 = np.asarray(jax.random.uniform(jax.random.key(5), (6, 4, 4, 1), minval=-1, maxval=1), np.float64)
  key = jax.random.key(8)
  _, metrics = training.train_step(state, jnp.asarray(x0, jnp.float32), key, schedule=sched, loss=loss,
                                   prediction=prediction, loss_weighting=weighting, min_snr_gamma=5.0)
  # The documented draw: example i's key is fold_in(split(fold_in(key, step))[0], i); t from its stream 0,
  # the noise from its stream 1.
  noise_key = jax.random.split(jax.random.fold_in(key, 3))[0]
  keys = [jax.random.fold_in(noise_key, i) for i in range(6)]
  t = np.array([int(jax.random.randint(jax.random.fold_in(k, 0), (), 0, 1000)) for k in keys])
  eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, 1), (4, 4, 1)), np.float64) for k in keys])
  a = abar[t][:, None, None, None]
  target = {"eps": eps, "x0": x0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}[prediction]
  snr = abar[t] / (1 - abar[t])
  w = np.ones(6) if weighting == "none" else {"eps": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1),
                                              "x0": np.minimum(snr, 5)}[prediction]
  w = np.sqrt(w) if loss == "l1" else w  # min-SNR under l1: the square roots (diffusion.loss_weights)
  err = np.abs(0.25 - target) if loss == "l1" else (0.25 - target) ** 2
  want = np.mean(w * err.reshape(6, -1).mean(axis=1))
  assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)


def test_labels_are_dropped_at_the_configured_rate_from_the_step_key():
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(3), jnp.arange(20000))
  labels = jnp.arange(20000) % 10
  dropped = training.drop_labels(labels, keys, 0.1)
  rate = float((dropped == -1).mean())
  # Binomial(20000, 0.1): s.d. of the rate 0.0021; allow 4 s.d. Kept labels are unchanged.
  assert abs(rate - 0.1) < 0.0085, rate
  np.testing.assert_array_equal(np.where(dropped == -1, labels, dropped), labels)
  np.testing.assert_array_equal(training.drop_labels(labels, keys, 0.1), dropped)  # a function of the keys
  assert (training.drop_labels(labels, keys, 0.0) == labels).all()
  assert (training.drop_labels(labels, keys, 1.0) == -1).all()


@pytest.mark.slow
def test_a_conditional_train_step_sees_the_labels_and_drops_them_all_at_probability_one():
  model = unet_preset("tiny", **SMALL_MODEL, num_classes=3)
  tx = optax.adam(1e-3)
  state = create_train_state(model, tx, jax.random.key(0), (1, 8, 8, 1))
  # Distinct label rows, so that the labels reaching the network change the loss.
  table = jax.random.normal(jax.random.key(1), state.params["label_embed"]["embedding"].shape)
  state = state.replace(params={**state.params, "label_embed": {"embedding": table}})
  batch = jax.random.uniform(jax.random.key(2), (8, 8, 8, 1), minval=-1, maxval=1)
  labels = jnp.arange(8) % 3
  step = jax.jit(functools.partial(training.train_step, schedule=make_schedule("linear", 100)))
  # Labels and the drop probability always passed: one compile serves every call (None labels, the U-Net's
  # unconditional row, is tested in test_unet as equal to NO_LABEL).
  loss = lambda labels, p: float(step(state, batch, jax.random.key(7), labels=labels, cond_drop_prob=p)[1]["loss"])
  none = loss(jnp.full(8, -1), 0.0)
  assert loss(labels, 1.0) == none  # every label dropped: the unconditional loss
  assert abs(loss(labels, 0.0) - none) > 1e-4  # labels kept: they reach the network
