"""The TrainState pytree: step, parameters, their EMA and the optimizer state, and the update that moves them."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


def ema_decay_at(decay: float, warmup: bool, num_updates: jnp.ndarray) -> jnp.ndarray:
  """The EMA decay after `num_updates` updates: `decay`, or min(decay, (1 + n) / (10 + n)) with warmup."""
  n = jnp.asarray(num_updates).astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay, jnp.float32)


class TrainState(flax.struct.PyTreeNode):
  """Everything a run carries from step to step.

  The PRNG key of step s and the data position are pure functions of
  (seed, step), so `step` is all that resuming needs besides the arrays.
  """

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, *, ema_decay: float, ema_warmup: bool = False) -> TrainState:
    """The state after one optimizer update with `grads` and the EMA update that follows it.

    Under gradient accumulation (optax.MultiSteps) the EMA moves only on the
    micro-steps that apply an update, and its warmup counts those updates.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    if isinstance(self.tx, optax.MultiSteps):
      updated, num_updates = self.tx.has_updated(opt_state), opt_state.gradient_step
    else:
      updated, num_updates = jnp.asarray(True), self.step + 1
    d = ema_decay_at(ema_decay, ema_warmup, num_updates)
    ema_params = jax.tree_util.tree_map(lambda e, p: jnp.where(updated, d * e + (1 - d) * p, e),
                                        self.ema_params, params)
    return self.replace(step=self.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)


def init_params(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> Any:
  """The model's freshly initialised "params" collection for NHWC inputs of `input_shape`."""
  x, t = jnp.zeros(input_shape, jnp.float32), jnp.zeros(input_shape[:1], jnp.int32)
  return model.init(key, x, t)["params"]


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...]) -> TrainState:
  """A fresh TrainState at step 0: params initialised from `key`, EMA equal to them, `tx` initialised."""

  @jax.jit
  def init(key):
    params = init_params(model, key, input_shape)
    return params, jax.tree_util.tree_map(jnp.copy, params), tx.init(params)

  params, ema_params, opt_state = init(key)  # EMA in buffers of its own: a donating step may reuse either
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=opt_state,
                    apply_fn=model.apply, tx=tx)
