"""Reverse-process samplers (DDPM ancestral, DDIM, DPM-Solver++(2M)) as one jit-compiled lax.scan.

`timesteps` gives the timesteps each method visits (the "leading", "trailing"
and "linspace" spacings of docs/architecture.md). Every sampler turns the
model's output (ε, v or x0, per `prediction`) into (x̂0, ε̂) in one place,
`_predict`. DDPM on fewer than T steps runs the chain of `respaced_schedule`,
as Improved DDPM (Nichol & Dhariwal 2021) does; a model output of twice the
image channels carries a learned variance, which DDPM uses and DDIM and
DPM-Solver++ ignore.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion, parallel
from ddpm_jax.schedule import Schedule, schedule_from_betas
from ddpm_jax.labels import NO_LABEL

EpsFn = Callable[..., jnp.ndarray]  # (x_t, t) -> model output; with labels, (x_t, t, labels) -> model output
METHODS = ("ddpm", "ddim", "dpmpp_2m")
VARIANCES = ("fixed_small", "fixed_large")
SPACINGS = ("leading", "trailing", "linspace")


def max_num_steps(method: str, num_timesteps: int, spacing: str = "leading") -> int:
  """The most steps `method` can take with `spacing` (and the num_steps that None means)."""
  return num_timesteps - 1 if method == "dpmpp_2m" and spacing != "trailing" else num_timesteps


def timesteps(method: str, num_timesteps: int, num_steps: Optional[int] = None,
              spacing: str = "leading") -> np.ndarray:
  """The descending int32 timesteps at which `method` calls the model, with `spacing` (docs/architecture.md).

  DDPM (all T by default) and DDIM follow diffusers' schedulers of the same
  name; DDPM's "linspace" is Improved DDPM's even spacing, "leading" its
  "ddimN" stride. DPM-Solver's leading and linspace spacings place
  num_steps + 1 points and drop the last, so they need num_steps <= T - 1.
  """
  T = num_timesteps
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown: choose one of {', '.join(METHODS)}")
  if spacing not in SPACINGS:
    raise ValueError(f"timestep_spacing={spacing!r} is unknown: choose one of {', '.join(SPACINGS)}")
  top = max_num_steps(method, T, spacing)
  n = top if num_steps is None else num_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= top:
    note = f" (method={method!r} with timestep_spacing={spacing!r} needs num_steps + 1 <= T)" if top < T else ""
    raise ValueError(f"num_steps={num_steps!r} is invalid: it must be an integer in [1, {top}]{note}")
  points = n + 1 if method == "dpmpp_2m" else n
  if spacing == "trailing":
    # A float arange can overshoot by one point just above 0; the first n are the spacing's.
    ts = np.round(np.arange(T, 0, -T / n))[:n] - 1
  elif spacing == "leading":
    ts = (np.arange(points) * (T // points))[::-1][:n]
  else:
    ts = np.round(np.linspace(0, T - 1, points))[::-1][:n]
  return ts.astype(np.int32)


def respaced_schedule(schedule: Schedule, ts: np.ndarray) -> Schedule:
  """The schedule of a chain through the distinct timesteps ts alone (Improved DDPM's respacing): its step i goes
  from the i-th smallest to the next smaller, β'_i = 1 - ᾱ_{t_(i)} / ᾱ_{t_(i-1)} (ᾱ = 1 before the first), every
  other coefficient derived from β' in float64 on the host."""
  if isinstance(schedule.betas, jax.core.Tracer):
    raise ValueError("DDPM on fewer steps than the schedule has respaces it on the host: pass a concrete schedule "
                     "(not one traced under jit)")
  betas, alphas = np.asarray(schedule.betas, np.float64), np.asarray(schedule.alphas, np.float64)
  # log(1 - β) from whichever float32 array holds it to full relative precision (β small: β; β near 1: 1 - β).
  log_abar = np.cumsum(np.where(betas < 0.5, np.log1p(-betas), np.log(alphas)))
  return schedule_from_betas(-np.expm1(np.diff(log_abar[np.sort(ts)], prepend=0.0)))


def _normal(keys: jax.Array, stream: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """Per-sample standard normal noise from stream `stream` of each sample's key."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape))(keys)


def guided(fn: EpsFn, labels: jnp.ndarray, guidance_scale: jnp.ndarray | float, one_call: bool) -> EpsFn:
  """(x_t, t) -> classifier-free guidance out_u + w (out_c - out_u) of a model fn(x_t, t, labels).

  The combination is taken in the model's output space (ε, v or x0): each of
  them is an affine function of the others at a fixed (x_t, t), so the guided
  ε, v and x̂0 are the same whichever space the combination is taken in, and
  the sampler's conversions and clipping follow it as for any model output.
  The conditional and unconditional halves run as one batched call; with
  `one_call` (w = 1, where the formula is out_c) only the conditional one. A
  learned variance (channels past x's) is the conditional call's.
  """
  if one_call:
    return lambda x, t: fn(x, t, labels)

  def call(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    both = fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
              jnp.concatenate([labels, jnp.full_like(labels, NO_LABEL)]))
    out_c, out_u = jnp.split(both, 2)
    c = x.shape[-1]
    guided_out = out_u[..., :c] + guidance_scale * (out_c[..., :c] - out_u[..., :c])
    return jnp.concatenate([guided_out, out_c[..., c:]], axis=-1)
  return call


def _predict(eps_fn, schedule, prediction, clip_x0, x, t, model_t):
  """(t as a [B] array, x̂0, ε̂, learned v or None) at step t of the schedule, the model called at model_t; with
  clipping, x̂0 is clipped to [-1, 1] and ε̂ recomputed from it."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  pred, v = diffusion.split_variance(eps_fn(x, jnp.full((x.shape[0],), model_t, jnp.int32)), x)
  x0, eps = diffusion.split_prediction(schedule, x, tb, pred, prediction)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = diffusion.predict_eps_from_x0(schedule, x, tb, x0)
  return tb, x0, eps, v


def _ddpm_step(predict, schedule, keys, variance, carry, xs):
  """(x_t, ·) -> (x_{t-1}, x̂0) by ancestral sampling, with the model's learned variance when it has one."""
  x, _ = carry
  t = xs["t"]
  tb, x0, _, v = predict(x, t, xs["model_t"])
  mean, _, _ = diffusion.q_posterior_mean_variance(schedule, x0, x, tb)
  std = jnp.exp(0.5 * diffusion.model_log_variance(schedule, tb, x, variance if v is None else "learned_range", v))
  z = _normal(keys, xs["stream"], x.shape[1:])
  return mean + jnp.where(t > 0, std, 0.0) * z, x0


def _ddim_step(predict, schedule, keys, eta, carry, xs):
  """(x_t, ·) -> (x_{t_prev}, x̂0) by DDIM (Song et al. eq. 12); ᾱ_prev = 1 on the last step returns x̂0."""
  x, _ = carry
  t, abar_prev = xs["t"], xs["abar_prev"]
  _, x0, eps, _ = predict(x, t, t)
  abar = schedule.alphas_cumprod[t]
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
  z = _normal(keys, xs["stream"], x.shape[1:])
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
  return jnp.sqrt(abar_prev) * x0 + direction * eps + sigma * z, x0


def _dpmpp_coefficients(schedule: Schedule, ts: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """DPM-Solver++(2M)'s per-step coefficients of x_next = a x + b (c x̂0 + d x̂0_prev); the last lands on σ = 0."""
  n = ts.shape[0]
  alpha, sigma = schedule.sqrt_alphas_cumprod[ts], schedule.sqrt_one_minus_alphas_cumprod[ts]
  lam = -jnp.log(schedule.sqrt_recipm1_alphas_cumprod[ts])  # λ = log(α / σ)
  last = jnp.arange(n) == n - 1
  h = jnp.append(lam[1:] - lam[:-1], 1.0)  # λ_next - λ; the last step's h = ∞ is handled by `last`
  h_prev = jnp.concatenate([jnp.ones((1,), h.dtype), h[:-1]])
  second = (jnp.arange(n) > 0) & ~last  # first order on the first and on the last step
  half_inv_r = jnp.where(second, 0.5 * h / h_prev, 0.0)  # 1 / (2 r) with r = h_prev / h
  return {
      "a": jnp.append(sigma[1:], 0.0) / sigma,
      "b": jnp.append(alpha[1:], 1.0) * jnp.where(last, 1.0, -jnp.expm1(-h)),  # α_next (1 - e^{-h})
      "c": 1.0 + half_inv_r,
      "d": -half_inv_r,
  }


def _dpmpp_step(predict, carry, xs):
  """(x_t, x̂0 of the previous step) -> (x_{t_next}, x̂0) by DPM-Solver++(2M) (Lu et al. 2022)."""
  x, x0_prev = carry
  _, x0, _, _ = predict(x, xs["t"], xs["t"])
  return xs["a"] * x + xs["b"] * (xs["c"] * x0 + xs["d"] * x0_prev), x0


@functools.partial(jax.jit, static_argnames=("eps_fn", "shape", "method", "variance", "clip_x0", "prediction",
                                             "stride", "one_call"))
def _chain(eps_fn, schedule, key, x_T, ts, model_ts, eta, index_offset, labels, guidance_scale, *, shape, method,
           variance, clip_x0, prediction, stride, one_call):
  """Runs the reverse chain through the schedule's steps ts, the model called at model_ts (DDPM respaced: the
  original timesteps); returns (x_0, x after every `stride`-th step or None)."""
  if labels is not None:
    eps_fn = guided(eps_fn, labels, guidance_scale, one_call)
  keys = diffusion.example_keys(key, shape[0], index_offset)
  x = _normal(keys, 0, shape[1:]) if x_T is None else x_T.astype(jnp.float32)
  predict = functools.partial(_predict, eps_fn, schedule, prediction, clip_x0)
  n = ts.shape[0]
  xs = {"t": ts, "stream": jnp.arange(1, n + 1)}
  if method == "ddpm":
    xs["model_t"] = model_ts
    step = functools.partial(_ddpm_step, predict, schedule, keys, variance)
  elif method == "ddim":
    xs["abar_prev"] = jnp.concatenate([schedule.alphas_cumprod[ts[1:]], jnp.ones((1,), jnp.float32)])
    step = functools.partial(_ddim_step, predict, schedule, keys, eta)
  else:
    xs.update(_dpmpp_coefficients(schedule, ts))
    step = functools.partial(_dpmpp_step, predict)
  body = lambda carry, xs: (step(carry, xs), None)
  carry = (x, jnp.zeros_like(x))  # (x_t, x̂0 of the previous step)
  if stride is None:
    (x, _), _ = jax.lax.scan(body, carry, xs)
    return x, None
  chunks = jax.tree_util.tree_map(lambda a: a.reshape((n // stride, stride) + a.shape[1:]), xs)
  outer = lambda carry, chunk: (lambda c: (c, c[0]))(jax.lax.scan(body, carry, chunk)[0])
  (x, _), traj = jax.lax.scan(outer, carry, chunks)
  return x, traj


def sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    options: Optional[SamplerOptions] = None,
    *,
    x_T: Optional[jnp.ndarray] = None,
    return_trajectory: bool = False,
    trajectory_stride: int = 1,
    index_offset: int | jnp.ndarray = 0,
    labels: Optional[jnp.ndarray] = None,
    **settings: Any,
):
  """Draws x_0 by running the reverse chain from x_T ~ N(0, I) (or the given x_T).

  The settings are `options` (a SamplerOptions; default: its defaults), with any
  of its fields given as keywords (method="ddim", eta=0.0, ...) in place of its
  values. `eps_fn(x_t, t)` returns the model output for a batch at int32
  timesteps t of shape [B]: ε, v or x0 as `prediction` says. `method` is "ddpm"
  (`variance`; on fewer than T steps, the chain of `respaced_schedule`), "ddim"
  (`eta`) or "dpmpp_2m" (deterministic); `num_steps` (None: `max_num_steps`) and
  `timestep_spacing` pick the timesteps (see `timesteps`). An output of twice
  x's channels carries a learned variance (diffusion.model_log_variance): DDPM
  uses it in place of `variance`, DDIM and DPM-Solver++ read the prediction.
  With `labels` (int [B]) the model is `eps_fn(x_t, t, labels)` and its output
  is guided with scale `guidance_scale` (see `guided`): 0 is unconditional, 1
  conditional, above 1 guided beyond it; without labels the scale has no effect.
  Sample b's noise comes from fold_in(key, index_offset + b) alone, so a sample
  depends only on that and its label, not on the batch it is drawn in.

  Args:
    eps_fn: the model function (ε, v or x0 out, as `prediction` says).
    schedule: the noise schedule the model was trained with.
    key: the samples' noise (with `index_offset`, see above).
    shape: [B, H, W, C] of the samples.
    options: the sampler's settings (SamplerOptions).
    x_T: the starting noise instead of the key's (shape `shape`).
    return_trajectory, trajectory_stride: also return x along the chain.
    index_offset: sample b's noise index is index_offset + b.
    labels: int class labels [B] of a conditional model.
    **settings: SamplerOptions fields replacing those of `options` (method,
      num_steps, eta, clip_x0, variance, timestep_spacing, prediction,
      guidance_scale); any other name is a TypeError.

  Returns:
    x_0 [*shape] (in [-1, 1] when clip_x0), or (x_0, trajectory) with
    `return_trajectory`: x after every `trajectory_stride`-th step, stacked on
    axis 0. A bad setting or shape raises ValueError naming it.
  """
  shape = tuple(int(s) for s in shape)
  options = dataclasses.replace(options or SamplerOptions(), **settings)
  chain = check_options(options, schedule.num_timesteps)
  num_steps = len(chain)
  if x_T is not None and tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
  if labels is not None and tuple(np.shape(labels)) != shape[:1]:
    raise ValueError(f"labels have shape {tuple(np.shape(labels))}, expected ({shape[0]},): one per sample")
  if return_trajectory and (trajectory_stride < 1 or num_steps % trajectory_stride):
    raise ValueError(f"trajectory_stride={trajectory_stride!r} must be a positive divisor of num_steps={num_steps}")
  model_ts, w = chain, options.guidance_scale
  if options.method == "ddpm" and num_steps < schedule.num_timesteps:
    schedule, chain = respaced_schedule(schedule, chain), np.arange(num_steps - 1, -1, -1, dtype=np.int32)
  x0, traj = _chain(eps_fn, schedule, key, x_T, jnp.asarray(chain), jnp.asarray(model_ts),
                    jnp.asarray(options.eta, jnp.float32), jnp.asarray(index_offset, jnp.int32),
                    None if labels is None else jnp.asarray(labels, jnp.int32),
                    jnp.asarray(w, jnp.float32), shape=shape, method=options.method, variance=options.variance,
                    clip_x0=options.clip_x0, prediction=options.prediction,
                    stride=trajectory_stride if return_trajectory else None,
                    one_call=not isinstance(w, jax.Array) and float(w) == 1.0)
  return (x0, traj) if return_trajectory else x0


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """The sampler's settings apart from the model, the schedule and the noise (`sample`'s `options`)."""

  method: str = "ddpm"
  num_steps: Optional[int] = None
  eta: float = 1.0
  clip_x0: bool = True
  variance: str = "fixed_small"
  timestep_spacing: str = "leading"
  prediction: str = "eps"
  guidance_scale: float = 1.0

  def sample(self, eps_fn: EpsFn, schedule: Schedule, key: jax.Array, shape: tuple[int, ...], *,
             x_T: Optional[jnp.ndarray] = None, return_trajectory: bool = False, trajectory_stride: int = 1,
             index_offset: int | jnp.ndarray = 0, labels: Optional[jnp.ndarray] = None):
    """`sample` with these settings."""
    return sample(eps_fn, schedule, key, shape, self, x_T=x_T, return_trajectory=return_trajectory,
                  trajectory_stride=trajectory_stride, index_offset=index_offset, labels=labels)


def check_options(options: SamplerOptions, num_timesteps: int) -> np.ndarray:
  """The timesteps the settings visit; a ValueError naming the first setting `sample` cannot run."""
  if options.variance not in VARIANCES:
    raise ValueError(f"variance={options.variance!r} is unknown: choose one of {', '.join(VARIANCES)}")
  if options.prediction not in diffusion.PREDICTIONS:
    raise ValueError(f"prediction={options.prediction!r} is unknown: choose one of {', '.join(diffusion.PREDICTIONS)}")
  eta = options.eta
  if not isinstance(eta, jax.Array) and not 0.0 <= float(eta) <= 1.0:
    raise ValueError(f"eta={eta!r} is out of range: it must lie in [0, 1]")
  w = options.guidance_scale
  if not isinstance(w, jax.Array) and not (isinstance(w, numbers.Real) and not isinstance(w, bool)
                                           and 0.0 <= float(w) < float("inf")):
    raise ValueError(f"guidance_scale={w!r} is invalid: it must be a number >= 0 (0 unconditional, 1 conditional)")
  return timesteps(options.method, num_timesteps, options.num_steps, options.timestep_spacing)


def make_generator(model_fn: Callable[..., jnp.ndarray], schedule: Schedule, image_shape: tuple[int, ...],
                   options: SamplerOptions, *, batch_size: int = 64, devices: Optional[list] = None
                   ) -> Callable[..., np.ndarray]:
  """A function (params, key, num_samples, progress=None, labels=None) -> float samples [N, *image_shape] in
  [-1, 1].

  Args:
    model_fn: the network as model_fn(params, x_t, t) (+ labels when given).
    schedule: the noise schedule the model was trained with.
    image_shape: (H, W, C) of one sample.
    options: the sampler's settings.
    batch_size: samples per compiled call, split over `devices`.
    devices: the devices to sample on (default: every device of every process).

  Returns:
    generate(params, key, num_samples, progress=None, labels=None): a NumPy
    array [num_samples, *image_shape]. Its `program` attribute maps (key
    impl, labelled) to the jitted sampler it calls, for lowering and export.

  `model_fn(params, x_t, t)` is the network (`model_fn(params, x_t, t, labels)`
  when `labels`, one int class per sample, are given: guided by
  `options.guidance_scale`). The sampler is compiled once (per kind of PRNG
  key, with or without labels), on the first call, for batches of `batch_size`
  split over `devices` (default: every device of every process; then every
  process calls it together and receives every sample; other lists need a
  single process); later calls with new params or keys reuse it. Sample i
  depends only on (key, i, label i), whatever the batch size or device count.
  `progress(done, total)` is called after each batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} is invalid: it must be >= 1")
  devices = list(devices or jax.devices())
  per_device = -(-batch_size // len(devices))
  _, rows, replicated = parallel.mesh_layout(devices, sharded=False)
  shape = (per_device,) + tuple(image_shape)

  def shard(params, key, offset, labels):
    return options.sample(functools.partial(model_fn, params), schedule, key, shape, index_offset=offset,
                          labels=labels)

  run = parallel.batch_programs(shard, devices, 0)
  per_call = per_device * len(devices)

  def generate(params: Any, key: jax.Array, num_samples: int, progress: Optional[Callable[[int, int], None]] = None,
               labels: Optional[np.ndarray] = None) -> np.ndarray:
    """`num_samples` samples drawn with `params` from `key` (of class labels[i] each, when given)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
      raise ValueError(f"num_samples={num_samples!r} is invalid: it must be an integer >= 1")
    if labels is not None and np.shape(labels) != (num_samples,):
      raise ValueError(f"labels have shape {np.shape(labels)}, expected ({num_samples},): one per sample")
    params = parallel.place(params, jax.tree_util.tree_map(lambda _: replicated, params))
    key_data = parallel.place(jax.random.key_data(key), replicated)
    step = run(jax.random.key_impl(key), labels is not None)
    # Past num_samples the last batch is filled with NO_LABEL samples, drawn and dropped.
    padded = None if labels is None else np.append(np.asarray(labels, np.int32),
                                                   np.full(-num_samples % per_call, NO_LABEL, np.int32))
    out = []
    for start in range(0, num_samples, per_call):
      offsets = parallel.place(start + per_device * np.arange(len(devices), dtype=np.int32), rows)
      extra = () if padded is None else (parallel.place(padded[start:start + per_call], rows),)
      out.append(parallel.host(step(params, key_data, offsets, *extra)))
      if progress is not None:
        progress(min(start + per_call, num_samples), num_samples)
    return np.concatenate(out)[:num_samples]

  generate.program = run  # (key impl, labelled) -> the jitted sharded sampler it calls, for lowering and export
  generate.batch_size = per_call  # samples per call: batch_size rounded up to a multiple of the device count
  return generate
