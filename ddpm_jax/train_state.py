"""The TrainState pytree that joins model, optimizer and EMA, and its construction from a config."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ddpm_jax.training import make_optimizer
from ddpm_jax.unet import unet_from_config


class TrainState(flax.struct.PyTreeNode):
  """Everything a run carries from step to step.

  The PRNG key of step s and the data position are pure functions of
  (config.seed, step), so `step` is all that resuming needs besides the arrays.
  """

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_train_state(config, key: jax.Array, input_shape: tuple[int, ...]) -> TrainState:
  """A fresh TrainState: U-Net params initialised from `key`, EMA = params, optimizer from config."""
  model = unet_from_config(config.model)
  model.validate(input_shape)
  tx = make_optimizer(config.optim, config.num_train_steps)

  @jax.jit
  def init(key):
    params = model.init(key, jnp.zeros(input_shape, jnp.float32), jnp.zeros(input_shape[:1], jnp.int32))["params"]
    return params, jax.tree_util.tree_map(jnp.copy, params), tx.init(params)

  params, ema_params, opt_state = init(key)  # EMA in buffers of its own: the train step donates both
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=opt_state,
                    apply_fn=model.apply, tx=tx)
