"""The TrainState pytree: step, parameters, their EMA and the optimizer state, and the update that moves them."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


# The initialisers run once: compiled without LLVM's optimisations, the program of ~100 PRNG calls compiles several
# times faster on the CPU (BENCHMARKS.md, "Start-up") and runs no slower that matters.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


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
  """The model's freshly initialised "params" collection for NHWC inputs of `input_shape`.

  Only the initialisers are computed: the forward pass is traced on shapes
  alone (flax's lazy_init) and dropped, so it is neither run nor compiled.
  """
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct(tuple(input_shape[:1]), jnp.int32)
  return model.lazy_init(key, x, t)["params"]


def state_from_params(model: nn.Module, tx: optax.GradientTransformation, params: Any) -> TrainState:
  """A TrainState at step 0 holding `params`, their EMA equal to them and `tx` initialised."""
  # The EMA in buffers of its own: a donating step may reuse either.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=tx.init(params), apply_fn=model.apply, tx=tx)


def init_program(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array, input_shape: tuple[int, ...],
                 layout: Optional[Callable[[TrainState], Any]] = None) -> tuple[Callable[[Any], TrainState], Any]:
  """(the jitted program that makes create_train_state's TrainState from key data, `key`'s data to give it)."""
  impl = jax.random.key_impl(key)

  def init(key_data: jax.Array) -> TrainState:
    return state_from_params(model, tx, init_params(model, jax.random.wrap_key_data(key_data, impl=impl),
                                                    input_shape))

  # A concrete key travels as host data, which every process holds whole: a key committed to one device could not
  # enter a program that spans other processes' devices. Under a trace (e.g. jax.eval_shape) the key is a tracer
  # and the program a nested one, which takes no compiler options.
  key_data = jax.random.key_data(key)
  traced = isinstance(key_data, jax.core.Tracer)
  key_data = key_data if traced else np.asarray(key_data)
  shardings = layout(jax.eval_shape(init, key_data)) if layout else None
  return jax.jit(init, out_shardings=shardings,
                 compiler_options=None if traced else INIT_COMPILER_OPTIONS), key_data


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       input_shape: tuple[int, ...],
                       layout: Optional[Callable[[TrainState], Any]] = None) -> TrainState:
  """A fresh TrainState at step 0: params initialised from `key`, EMA equal to them, `tx` initialised.

  Everything is computed by one jitted program on the devices (init_program).
  `layout` maps the abstract state (jax.ShapeDtypeStruct leaves) to the
  shardings to create it in (a Runner's state_shardings): each device then
  computes and holds only its own shards, and no host ever holds the state.
  Without it (or when it returns None), the state is created on the default
  device.
  """
  program, key_data = init_program(model, tx, key, input_shape, layout)
  return program(key_data)
