"""Learned variances: the U-Net's extra output channels and the hybrid loss's gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import training
from ddpm_jax.schedule import make_schedule
from ddpm_jax.train_state import TrainState, init_params
from ddpm_jax.unet import count_params, unet_preset


def test_learn_variance_doubles_the_output_channels_and_adds_only_the_head_weights():
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  shapes = {}
  for learn in (False, True):
    model = unet_preset("tiny", learn_variance=learn)
    params = jax.eval_shape(lambda m=model: init_params(m, jax.random.key(0), x.shape))
    out = jax.eval_shape(lambda p, m=model: m.apply({"params": p}, jnp.zeros(x.shape), jnp.zeros(2, jnp.int32)),
                         params)
    shapes[learn] = (out.shape, count_params(params))
  assert shapes[False][0] == (2, 8, 8, 3) and shapes[True][0] == (2, 8, 8, 6)
  # The head is a 3x3 conv from the 16 base channels: 3 more outputs add 3 x 3 x 16 x 3 weights and 3 biases.
  assert shapes[True][1] - shapes[False][1] == 3 * 3 * 16 * 3 + 3


T = 4  # with 16 examples, the step's draw below puts examples at t = 0 (the decoder term) and at t >= 1
SCHED = make_schedule("linear", T, 1e-4, 0.3)


def toy_model(variables, x, t, train, rngs):
  """An output of twice x's channels: the prediction a x + b, then the variance's v = tanh(c x + d)."""
  p = variables["params"]
  return jnp.concatenate([p["a"] * x + p["b"], jnp.tanh(p["c"] * x + p["d"])], axis=-1)


@pytest.fixture(scope="module")
def steps():
  """(grads, metrics) of one step at vlb_weight 0 and at 0.01 (one compilation: the weight is an argument)."""
  params = {"a": jnp.float32(0.3), "b": jnp.float32(0.1), "c": jnp.float32(0.5), "d": jnp.float32(-0.2)}
  tx = optax.sgd(1.0)  # params - new params = the gradient
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                     apply_fn=toy_model, tx=tx)
  batch = jax.random.uniform(jax.random.key(1), (16, 4, 4, 1), minval=-1, maxval=1)
  batch = jnp.round((batch + 1) * 127.5) / 127.5 - 1  # on the 8-bit grid, as the bound requires
  step = jax.jit(lambda w: training.train_step(state, batch, jax.random.key(2), schedule=SCHED, loss="l2",
                                               vlb_weight=w))
  out = {}
  for w in (0.0, 0.01):
    new, metrics = step(jnp.float32(w))
    out[w] = ({k: float(params[k] - new.params[k]) for k in params},
              {k: float(v) for k, v in metrics.items() if v is not None})
  return out


def test_the_vlb_term_trains_the_variance_and_not_the_mean(steps):
  # The draw of train_step (its docstring): example i's t from stream 0 of fold_in(split(fold_in(key, 0))[0], i).
  noise_key = jax.random.split(jax.random.fold_in(jax.random.key(2), 0))[0]
  t = [int(jax.random.randint(jax.random.fold_in(jax.random.fold_in(noise_key, i), 0), (), 0, T)) for i in range(16)]
  assert 0 in t and max(t) > 0
  (g0, m0), (g1, m1) = steps[0.0], steps[0.01]
  assert all(np.isfinite(v) for v in [*g1.values(), *m1.values()])
  # The mean's parameters see only the simple loss: the VLB term adds exactly nothing to their gradient.
  assert (g1["a"], g1["b"]) == (g0["a"], g0["b"])
  # The variance's parameters see only the VLB term, scaled by λ T (none without it).
  assert g0["c"] == g0["d"] == 0.0 and abs(g1["c"]) > 1e-4 and abs(g1["d"]) > 1e-4
  # The loss is simple + λ T L_t, with L_t the batch's mean term in bits (the same at either weight).
  assert m1["vlb"] == m0["vlb"] > 0
  assert m1["loss"] - m0["loss"] == pytest.approx(0.01 * T * m1["vlb"], rel=1e-5)


def test_vlb_weight_without_learned_variances_is_an_error():
  model = lambda variables, x, t, train, rngs: variables["params"]["a"] * x
  params = {"a": jnp.float32(0.3)}
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, ema_params=params,
                     opt_state=optax.sgd(1.0).init(params), apply_fn=model, tx=optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"^vlb_weight=0.001 needs a network with learned variances"):
    jax.eval_shape(lambda: training.train_step(state, jnp.zeros((2, 4, 4, 1)), jax.random.key(0), schedule=SCHED,
                                               vlb_weight=0.001))  # raised while tracing: nothing runs


def test_the_hybrid_config_builds_a_learned_variance_model_and_bad_weights_are_named():
  from configs import digits_hybrid  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders  # pylint: disable=g-import-not-at-top

  config = digits_hybrid.get_config()
  builders.validate(config)
  assert builders.build_model(config).learn_variance and builders.nll_variance(config) == "learned_range"
  assert builders.build_train_step(config, SCHED).keywords["vlb_weight"] == 0.001
  for key, value, message in [
      ("diffusion.vlb_weight", 0.0, "diffusion.vlb_weight=0.0 leaves the variance of model.learn_variance=True "
                                    "untrained"),
      ("diffusion.vlb_weight", -1.0, "diffusion.vlb_weight=-1.0 is invalid: it must be >= 0"),
      ("eval.nll_num_images", 100, "eval.nll_num_images=100 needs eval_every_steps > 0"),
      ("eval.nll_num_images", -1, "eval.nll_num_images=-1 is invalid: use 0 (off) or a number of images")]:
    bad = digits_hybrid.get_config()
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match="^" + re.escape(message)):
      builders.validate(bad)
