"""The optimizer, the pure train step and its jit/pmap wrappers."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion
from ddpm_jax.schedule import Schedule

if TYPE_CHECKING:
  from ddpm_jax.train_state import TrainState

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim, num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then constant or cosine decay to 0 at num_train_steps."""
  if optim.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"optim.lr_schedule={optim.lr_schedule!r} is unknown: choose one of {', '.join(LR_SCHEDULES)}")
  if not optim.learning_rate > 0:
    raise ValueError(f"optim.learning_rate={optim.learning_rate!r} is invalid: it must be > 0")
  if optim.warmup_steps < 0:
    raise ValueError(f"optim.warmup_steps={optim.warmup_steps!r} is invalid: it must be >= 0")
  lr, warmup = float(optim.learning_rate), int(optim.warmup_steps)
  if optim.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_train_steps, warmup + 1), 0.0)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(optim, num_train_steps: int) -> optax.GradientTransformation:
  """Adam or AdamW with the learning-rate schedule, optional global-norm clipping and gradient accumulation."""
  if optim.optimizer not in OPTIMIZERS:
    raise ValueError(f"optim.optimizer={optim.optimizer!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
  if optim.grad_clip_norm < 0:
    raise ValueError(f"optim.grad_clip_norm={optim.grad_clip_norm!r} is invalid: use 0 (off) or a positive norm")
  if optim.grad_accum_steps < 1:
    raise ValueError(f"optim.grad_accum_steps={optim.grad_accum_steps!r} is invalid: it must be >= 1")
  schedule = learning_rate_schedule(optim, num_train_steps // optim.grad_accum_steps)
  kw = dict(learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.optimizer == "adamw":
    opt = optax.inject_hyperparams(optax.adamw)(weight_decay=optim.weight_decay, **kw)
  else:
    opt = optax.inject_hyperparams(optax.adam)(**kw)
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), opt) if optim.grad_clip_norm > 0 else opt
  return optax.MultiSteps(tx, optim.grad_accum_steps) if optim.grad_accum_steps > 1 else tx


def ema_decay(decay: float, warmup: bool, num_updates: jnp.ndarray) -> jnp.ndarray:
  """The EMA decay after `num_updates` updates: `decay`, or min(decay, (1 + n) / (10 + n)) with warmup."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay, jnp.float32)


def train_step(state: TrainState, batch: jnp.ndarray, key: jax.Array, *, schedule: Schedule, loss_kind: str = "l1",
               ema: float = 0.9999, ema_warmup: bool = False, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One optimisation step on this device's batch [b, H, W, C].

  Example i of device d has global index d·b + i; its timestep and noise come
  from that index folded into this step's key, so they do not depend on how the
  global batch is split over devices or hosts. Gradients and metrics are
  averaged over `axis_name` when given.
  """
  b = batch.shape[0]
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  noise_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
  example_keys = jax.vmap(jax.random.fold_in, (None, 0))(noise_key, device * b + jnp.arange(b))
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, schedule.num_timesteps))(example_keys)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), batch.shape[1:]))(example_keys)
  dropout_key = jax.random.fold_in(dropout_key, device)
  x_t = diffusion.q_sample(schedule, batch, t, noise)

  def loss_of(params):
    pred = state.apply_fn({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key})
    return diffusion.loss_fn(pred, noise, loss_kind)

  loss, grads = jax.value_and_grad(loss_of)(state.params)
  if axis_name:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if isinstance(state.tx, optax.MultiSteps):  # the EMA follows only the steps that apply an update
    updated, num_updates = state.tx.has_updated(opt_state), opt_state.gradient_step
  else:
    updated, num_updates = True, state.step + 1
  decay = ema_decay(ema, ema_warmup, num_updates)
  ema_params = jax.tree_util.tree_map(lambda e, p: jnp.where(updated, decay * e + (1 - decay) * p, e),
                                      state.ema_params, params)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 lr=optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array)))
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics


def make_train_step(config, schedule: Schedule, use_pmap: bool) -> Callable[..., Any]:
  """train_step bound to the config: jit on one device, or pmap over axis 'batch' across all devices and hosts.

  The returned function takes (state, batch, key): with jit the batch is
  [B, H, W, C]; with pmap it is [local devices, b, H, W, C], the state is
  replicated over local devices and the key is shared.
  """
  step = functools.partial(train_step, schedule=schedule, loss_kind=config.diffusion.loss, ema=config.ema.decay,
                           ema_warmup=config.ema.warmup)
  if not use_pmap:
    return jax.jit(step, donate_argnums=0)
  return jax.pmap(functools.partial(step, axis_name="batch"), axis_name="batch", in_axes=(0, 0, None),
                  donate_argnums=0)
