"""The config edge: the one library module that reads an experiment config; it validates it and builds its parts.

Everything else in ddpm_jax takes explicit arguments. `validate` checks every
value that can be checked without compiling or touching the disk;
`build_training` and the other builders turn a validated config into the
model, optimizer, schedule, train step, data stream, sampler and evaluator.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import optax

from ddpm_jax import checkpoint, data, diffusion, evaluation, images, loop, parallel, sampling, training
from ddpm_jax.evaluation import Evaluator
from ddpm_jax.reporting import MetricWriter
from ddpm_jax.schedule import Schedule, make_schedule
from ddpm_jax.train_state import create_train_state, init_params
from ddpm_jax.unet import UNet, unet_preset

REQUIRED = ("seed", "batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "image_size",
            "dataset")
PARALLELISMS = ("pmap",)


@contextlib.contextmanager
def _section(name: str):
  """Prefixes the ValueErrors raised inside with `name.`, so that they name the config key."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"{name}.{e}") from None


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises unless config[key] is an integer >= 1."""
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{key}={value!r} is invalid: it must be an integer >= 1")


def _choice(key: str, value: Any, allowed: tuple) -> None:
  """Raises unless value is one of allowed."""
  if value not in allowed:
    raise ValueError(f"{key}={value!r} is unknown: choose one of {', '.join(map(str, allowed))}")


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images the config trains on."""
  return (config.image_size, config.image_size, config.data.channels)


def build_model(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net: config.model's preset with its non-None fields overriding it."""
  fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}  # a saved config gives lists
  return unet_preset(config.model.preset, **fields)


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The diffusion schedule of config.diffusion."""
  d = config.diffusion
  with _section("diffusion"):
    return make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer of config.optim, its schedule spanning config.num_train_steps."""
  with _section("optim"):
    return training.make_optimizer(total_steps=config.num_train_steps, **config.optim)


def build_train_step(config: ml_collections.ConfigDict, schedule: Schedule) -> Callable:
  """training.train_step with the config's loss and EMA settings bound (state, batch, key, axis_name=None)."""
  d = config.diffusion
  return functools.partial(training.train_step, schedule=schedule, loss=d.loss, ema_decay=config.ema.decay,
                           ema_warmup=config.ema.warmup, prediction=d.prediction, loss_weighting=d.loss_weighting,
                           min_snr_gamma=d.min_snr_gamma)


def sampler_options(config: ml_collections.ConfigDict, **overrides: Any) -> sampling.SamplerOptions:
  """The sampler settings of config.sample (fields overridable), with the run's prediction target."""
  s = {**config.sample, **{k: v for k, v in overrides.items() if v is not None}}
  return sampling.SamplerOptions(method=s["method"], num_steps=s["num_steps"] if s["method"] != "ddpm" else None,
                                 eta=s["eta"], clip_x0=s["clip_x0"], variance=s["variance"],
                                 timestep_spacing=s["timestep_spacing"], prediction=config.diffusion.prediction)


def validate(config: ml_collections.ConfigDict, *, device_count: int = 1, process_count: int = 1,
             stop_at_step: Optional[int] = None) -> None:
  """Raises ValueError for any config value a run cannot use, before anything is compiled or written."""
  missing = [key for key in REQUIRED if key not in config]
  if missing:
    raise ValueError(f"config has no {missing[0]!r}: every config needs {', '.join(REQUIRED)}")
  for key in ("batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "image_size",
              "keep_checkpoints"):
    _positive_int(config, key)
  if stop_at_step is not None and stop_at_step < 1:
    raise ValueError(f"stop_at_step={stop_at_step!r} is invalid: it must be >= 1")
  data.parse_dataset(config.dataset)
  _choice("parallelism", config.parallelism, PARALLELISMS)
  if config.batch_size % device_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {device_count} devices: "
                     f"use a multiple of {device_count}")
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {process_count} processes")
  _choice("data.channels", config.data.channels, (1, 3))
  build_model(config).validate((1,) + image_shape(config))
  schedule = build_schedule(config)
  build_optimizer(config)
  _choice("diffusion.loss", config.diffusion.loss, diffusion.LOSSES)
  _choice("diffusion.prediction", config.diffusion.prediction, diffusion.PREDICTIONS)
  _choice("diffusion.loss_weighting", config.diffusion.loss_weighting, diffusion.LOSS_WEIGHTINGS)
  if not config.diffusion.min_snr_gamma > 0:
    raise ValueError(f"diffusion.min_snr_gamma={config.diffusion.min_snr_gamma!r} is invalid: it must be > 0")
  if not 0.0 <= config.ema.decay < 1.0:
    raise ValueError(f"ema.decay={config.ema.decay!r} is invalid: it must lie in [0, 1) (0 keeps no average)")
  validate_sampler(sampler_options(config), schedule.num_timesteps, "sample.")
  for key in ("sample.every_steps", "eval_every_steps"):
    section, _, name = key.rpartition(".")
    value = (config[section] if section else config)[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{key}={value!r} is invalid: use 0 (off) or a number of steps")
  if config.eval_every_steps and config.dataset != "digits":
    evaluation.inception.check_weights_path(config.inception_weights or "")


def validate_sampler(options: sampling.SamplerOptions, num_timesteps: int, prefix: str = "") -> None:
  """Raises ValueError for sampler settings that `sampling.sample` would refuse, naming them with `prefix`."""
  with _section(prefix.rstrip(".")) if prefix else contextlib.nullcontext():
    sampling.check_options(options, num_timesteps)


def model_fn(model: UNet) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """(params, x_t, t) -> the network's output."""
  return lambda params, x, t: model.apply({"params": params}, x, t)


def build_generator(config: ml_collections.ConfigDict, model: UNet, schedule: Schedule,
                    options: sampling.SamplerOptions, batch_size: Optional[int] = None) -> Callable[..., np.ndarray]:
  """sampling.make_generator for the config's image shape and sampler batch size."""
  return sampling.make_generator(model_fn(model), schedule, image_shape(config), options,
                                 batch_size=batch_size or config.sample.batch_size)


def build_source(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1) -> data.Source:
  """The dataset the config names (for TFDS, this process's split); raises ValueError when it cannot be read."""
  return data.make_source(config.dataset, data_dir=config.data.data_dir, split=config.data.split,
                          download=config.data.download, process_index=process_index, process_count=process_count)


def build_batches(config: ml_collections.ConfigDict, source: data.Source, process_index: int = 0,
                  process_count: int = 1) -> Callable[[int], Iterator[np.ndarray]]:
  """start_step -> this process's training batches from that step on."""
  return lambda start: data.batch_stream(
      source, seed=config.seed, global_batch=config.batch_size, image_size=config.image_size,
      channels=config.data.channels, random_flip=config.data.random_flip, start_step=start,
      process_index=process_index, process_count=process_count, shuffle_buffer=config.data.shuffle_buffer)


def build_evaluator(config: ml_collections.ConfigDict, workdir: str) -> Evaluator:
  """The digits judge for the embedded digits, Inception FID / KID / IS for any other dataset."""
  if config.dataset == "digits":
    return evaluation.digits_evaluator(workdir, config.seed)
  source = build_source(config)
  num_real = min(config.fid_num_real, source.size)
  real = lambda: data.batch_stream(source, seed=0, global_batch=config.eval_batch_size, image_size=config.image_size,
                                   channels=config.data.channels, random_flip=False)
  path = evaluation.fid_stats_path(config.inception_weights, config.dataset, config.data.split, config.image_size,
                                   config.data.channels, num_real)
  return evaluation.inception_evaluator(config.inception_weights, real, num_real, path, config.eval_batch_size)


def _sample_grid_hook(workdir: str, generate: Callable, key: jax.Array, num_samples: int) -> Callable:
  """A loop hook writing a grid of EMA samples to workdir/samples/step_N.png and TensorBoard."""

  def run(step: int, ema_params: Any, writer: MetricWriter) -> None:
    samples = generate(ema_params, key, num_samples)
    grid = images.make_grid(images.to_uint8(samples), scale=None)
    images.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)
    writer.write_image(step, "samples", grid)
  return run


def _eval_hook(generate: Callable, evaluate: Evaluator, key: jax.Array, num_samples: int) -> Callable:
  """A loop hook scoring EMA samples and logging the numbers as eval/*."""

  def run(step: int, ema_params: Any, writer: MetricWriter) -> None:
    result = evaluate(generate(ema_params, key, num_samples))
    writer.write(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
    print(f"eval at step {step}: {evaluation.report(result)}", flush=True)
  return run


def build_training(config: ml_collections.ConfigDict, workdir: str,
                   stop_at_step: Optional[int] = None) -> loop.Training:
  """Validates the config and builds every part of its training run; reads the dataset, writes nothing."""
  validate(config, device_count=jax.device_count(), process_count=jax.process_count(), stop_at_step=stop_at_step)
  model, schedule, tx = build_model(config), build_schedule(config), build_optimizer(config)
  init_key, train_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
  input_shape = (1,) + image_shape(config)
  source = build_source(config, jax.process_index(), jax.process_count())
  hooks = []
  if config.sample.every_steps or config.eval_every_steps:
    generate = build_generator(config, model, schedule, sampler_options(config))
    hooks.append(loop.Hook(config.sample.every_steps,
                           _sample_grid_hook(workdir, generate, sample_key, config.sample.num_samples)))
    if config.eval_every_steps:
      hooks.append(loop.Hook(config.eval_every_steps, _eval_hook(generate, build_evaluator(config, workdir),
                                                                 sample_key, config.eval_num_samples)))
  return loop.Training(
      create_state=lambda: create_train_state(model, tx, init_key, input_shape),
      runner=parallel.make_runner(build_train_step(config, schedule)),
      batches=build_batches(config, source, jax.process_index(), jax.process_count()),
      key=train_key,
      num_train_steps=config.num_train_steps,
      end_step=min(config.num_train_steps, stop_at_step or config.num_train_steps),
      batch_size=config.batch_size,
      log_every=config.log_every_steps,
      checkpoint_every=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints,
      config=config.to_dict(),
      hooks=tuple(hooks))


def restore_sampling_params(config: ml_collections.ConfigDict, workdir: str, step: int, ema: bool = True) -> Any:
  """Only the EMA (or raw) parameters of a workdir's checkpoint `step`, for the config's model."""
  model = build_model(config)
  template = jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1,) + image_shape(config)))
  manager = checkpoint.make_manager(workdir, create=False)
  try:
    return checkpoint.restore_params(manager, template, step, ema=ema)
  finally:
    manager.close()
