"""The optimizer from explicit arguments and the pure train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion, likelihood
from ddpm_jax.schedule import Schedule
from ddpm_jax.train_state import TrainState
from ddpm_jax.labels import NO_LABEL

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                           lr_schedule: str = "cosine") -> optax.Schedule:
  """Linear warmup from 0 over warmup_steps, then constant, or cosine decay to 0 at total_steps."""
  if lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule={lr_schedule!r} is unknown: choose one of {', '.join(LR_SCHEDULES)}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate={learning_rate!r} is invalid: it must be > 0")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps!r} is invalid: it must be >= 0")
  lr, warmup = float(learning_rate), int(warmup_steps)
  if lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), 0.0)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, lr_schedule: str = "cosine",
                   optimizer: str = "adamw", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip_norm: float = 1.0,
                   grad_accum_steps: int = 1) -> optax.GradientTransformation:
  """Adam or AdamW with the learning-rate schedule, optional global-norm clipping and gradient accumulation.

  Args:
    learning_rate: the peak learning rate.
    total_steps: train steps (micro-steps under accumulation); the schedule
      spans the total_steps // grad_accum_steps updates they apply.
    warmup_steps: updates of linear warmup from 0 to the peak.
    lr_schedule: the decay after the warmup (LR_SCHEDULES).
    optimizer: "adam" or "adamw" (OPTIMIZERS), with b1, b2, eps and, for
      adamw, weight_decay.
    grad_clip_norm: the global gradient norm clipped to; 0 turns clipping off.
    grad_accum_steps: micro-steps whose mean gradient makes one update
      (optax.MultiSteps) when above 1.

  Returns:
    The optax transformation; a bad name or value raises ValueError naming it.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
  if grad_clip_norm < 0:
    raise ValueError(f"grad_clip_norm={grad_clip_norm!r} is invalid: use 0 (off) or a positive norm")
  if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps={grad_accum_steps!r} is invalid: it must be an integer >= 1")
  schedule = learning_rate_schedule(learning_rate=learning_rate, total_steps=total_steps // grad_accum_steps,
                                    warmup_steps=warmup_steps, lr_schedule=lr_schedule)
  kw = dict(learning_rate=schedule, b1=b1, b2=b2, eps=eps)
  if optimizer == "adamw":
    opt = optax.inject_hyperparams(optax.adamw)(weight_decay=weight_decay, **kw)
  else:
    opt = optax.inject_hyperparams(optax.adam)(**kw)
  tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt) if grad_clip_norm > 0 else opt
  return optax.MultiSteps(tx, grad_accum_steps) if grad_accum_steps > 1 else tx


def _current_lr(opt_state: optax.OptState) -> jnp.ndarray:
  """The learning rate that inject_hyperparams recorded in the optimizer state."""
  return optax.tree_utils.tree_get(opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, jax.Array))


def drop_labels(labels: jnp.ndarray, example_keys: jax.Array, cond_drop_prob: float) -> jnp.ndarray:
  """Each label replaced by NO_LABEL with probability cond_drop_prob, by a coin from its example's key."""
  coins = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(example_keys)
  return jnp.where(coins < cond_drop_prob, NO_LABEL, labels)


def train_step(state: TrainState, batch: jnp.ndarray, key: jax.Array, *, schedule: Schedule, loss: str = "l1",
               ema_decay: float = 0.9999, ema_warmup: bool = False, prediction: str = "eps",
               loss_weighting: str = "none", min_snr_gamma: float = 5.0, labels: jnp.ndarray | None = None,
               cond_drop_prob: float = 0.0, vlb_weight: float = 0.0, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One optimisation step on a batch of images; returns the new state and its metrics.

  Args:
    state: the TrainState before the step (its apply_fn is the network).
    batch: images [b, H, W, C] in [-1, 1].
    key: this run's key; the step folds in state.step, so one key serves a run.
    schedule: the noise schedule (T = schedule.num_timesteps).
    loss, prediction, loss_weighting, min_snr_gamma: the objective (below).
    ema_decay, ema_warmup: the EMA update (TrainState.apply_gradients).
    labels, cond_drop_prob: class conditioning (below); None: unconditional.
    vlb_weight: λ of the hybrid loss of a learned-variance network (below).
    axis_name: the device axis to average over under pmap / shard_map.

  Returns:
    (the state after the update, metrics): `loss` (the weighted objective),
    `grad_norm`, `lr`, and `vlb` for a learned-variance network.

  The network learns `prediction` (ε, v or x0) under the `loss` (l1 or l2)
  of each example, weighted by `loss_weighting` ("none" or "min_snr" with
  γ = min_snr_gamma). With `labels` (int [b]; a class-conditional network),
  each label is replaced by NO_LABEL with probability `cond_drop_prob`, so the
  network also learns the unconditional output that guidance needs.

  A network with learned variances (twice the image channels out) trains on
  Nichol & Dhariwal's hybrid loss: the above + vlb_weight · T · L_t, L_t the
  bound's term at each example's t in bits per dimension (likelihood.vb_terms)
  with the prediction's gradient stopped, so that L_t trains the variance alone;
  metrics then hold `vlb`, the batch mean of L_t.

  Example i of the batch on device d (of `axis_name`, when given) has global
  index d·b + i; its timestep, noise and label coin come from that index
  folded into this step's key, so they do not depend on how the global batch
  is split over devices or hosts. Gradients and metrics are averaged over
  `axis_name`.
  """
  b = batch.shape[0]
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  noise_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
  example_keys = jax.vmap(jax.random.fold_in, (None, 0))(noise_key, device * b + jnp.arange(b))
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, schedule.num_timesteps))(example_keys)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), batch.shape[1:]))(example_keys)
  dropout_key = jax.random.fold_in(dropout_key, device)
  x_t = diffusion.q_sample(schedule, batch, t, noise)
  target = diffusion.prediction_target(schedule, batch, t, noise, prediction)
  weights = diffusion.loss_weights(schedule, t, prediction=prediction, weighting=loss_weighting, loss=loss,
                                   min_snr_gamma=min_snr_gamma)
  conditioning = {} if labels is None else {"labels": drop_labels(labels, example_keys, cond_drop_prob)}

  def loss_of(params):
    out = state.apply_fn({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key}, **conditioning)
    pred, v = diffusion.split_variance(out, x_t)
    simple = diffusion.loss_fn(pred, target, loss, weights)
    if v is None:
      if not isinstance(vlb_weight, jax.Array) and vlb_weight:
        raise ValueError(f"vlb_weight={vlb_weight!r} needs a network with learned variances (learn_variance=True): "
                         "the bound's term would train nothing")
      return simple, {}
    vlb = likelihood.vb_terms(schedule, batch, x_t, t, jnp.concatenate([jax.lax.stop_gradient(pred), v], axis=-1),
                              variance="learned_range", prediction=prediction, clip_x0=False)
    return simple + vlb_weight * schedule.num_timesteps * jnp.mean(vlb), {"vlb": jnp.mean(vlb)}

  (value, extra), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  if axis_name:
    value, extra, grads = jax.lax.pmean((value, extra, grads), axis_name)
  new_state = state.apply_gradients(grads, ema_decay=ema_decay, ema_warmup=ema_warmup)
  metrics = dict(loss=value, grad_norm=optax.tree.norm(grads), lr=_current_lr(new_state.opt_state), **extra)
  return new_state, metrics
