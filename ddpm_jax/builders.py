"""The config edge: the one library module that reads an experiment config; it validates it and builds its parts.

Everything else in ddpm_jax takes explicit arguments. `validate` checks every
value that can be checked without compiling or touching the disk;
`build_training` and the other builders turn a validated config into the
model, optimizer, schedule, train step, data stream, sampler and evaluator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from ddpm_jax import (checkpoint, consensus, data, diffusion, evaluation, hooks, inception, likelihood, loop,
                      parallel, preflight, reporting, run_record, sampling, training)
from ddpm_jax.evaluation import Evaluator
from ddpm_jax.schedule import Schedule, make_schedule
from ddpm_jax.train_state import create_train_state, init_params
from ddpm_jax.unet import UNet, cudnn_attention_runs, unet_preset

REQUIRED = ("seed", "batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "image_size",
            "dataset")


@contextlib.contextmanager
def _section(name: str):
  """Prefixes the ValueErrors raised inside with `name.`, so that they name the config key."""
  try:
    yield
  except ValueError as e:
    raise ValueError(f"{name}.{e}") from None


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
  """Raises unless config[key] is an integer >= 1."""
  section, _, name = key.rpartition(".")
  value = (config[section] if section else config)[name]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{key}={value!r} is invalid: it must be an integer >= 1")


def _choice(key: str, value: Any, allowed: tuple) -> None:
  """Raises unless value is one of allowed."""
  if value not in allowed:
    raise ValueError(f"{key}={value!r} is unknown: choose one of {', '.join(map(str, allowed))}")


def config_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted key, value) of every leaf of a config."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from config_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def define_config_file_flag(default: Optional[str], help_text: str) -> None:
  """Defines absl's --config flag: an ml_collections config file whose fields override as --config.key=value."""
  config_flags.DEFINE_config_file("config", default, help_text)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images the config trains on."""
  return (config.image_size, config.image_size, config.data.channels)


def build_model(config: ml_collections.ConfigDict) -> UNet:
  """The U-Net: config.model's preset with its non-None fields overriding it."""
  fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}  # a saved config gives lists
  return unet_preset(config.model.preset, **fields)


# UNet fields that leave trained parameters meaning the same: compute precision, dropout rate, initialisation, the
# attention kernel.
_FREE_MODEL_FIELDS = ("dtype", "dropout", "init_scheme", "attention", "parent", "name")


def parameter_meaning(config: dict) -> dict[str, Any]:
  """What gives a config's parameters their meaning, by dotted key: every architecture field of the model it builds
  (presets resolved), the image shape, the prediction target and the noise schedule (the network's t input)."""
  c = ml_collections.ConfigDict(config)
  model = build_model(c)
  meaning = {f"model.{f.name}": getattr(model, f.name) for f in dataclasses.fields(model)
             if f.name not in _FREE_MODEL_FIELDS}
  d = c.diffusion
  return {**meaning, "image_size": c.image_size, "data.channels": c.data.channels, "diffusion.prediction": d.prediction,
          "diffusion.schedule": d.schedule, "diffusion.num_timesteps": d.num_timesteps,
          "diffusion.beta_start": d.beta_start, "diffusion.beta_end": d.beta_end}


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The diffusion schedule of config.diffusion."""
  d = config.diffusion
  with _section("diffusion"):
    return make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer of config.optim, its schedule spanning config.num_train_steps."""
  with _section("optim"):
    return training.make_optimizer(total_steps=config.num_train_steps, **config.optim)


def conditional(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model is class-conditional."""
  return bool(config.model.get("num_classes"))


def learns_variance(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model learns its variances (twice the output channels)."""
  return bool(config.model.get("learn_variance"))


def nll_variance(config: ml_collections.ConfigDict, variance: Optional[str] = None) -> str:
  """The variance of the run's likelihood bound: learned_range for a model that learns it, else `variance` or the
  sampler's."""
  return "learned_range" if learns_variance(config) else variance or config.sample.variance


def build_train_step(config: ml_collections.ConfigDict, schedule: Schedule) -> Callable:
  """training.train_step with the config's loss and EMA settings bound (state, batch, key, axis_name=None); a
  conditional model's batches are (images, labels) pairs."""
  d = config.diffusion
  step = functools.partial(training.train_step, schedule=schedule, loss=d.loss, ema_decay=config.ema.decay,
                           ema_warmup=config.ema.warmup, prediction=d.prediction, loss_weighting=d.loss_weighting,
                           min_snr_gamma=d.min_snr_gamma,
                           vlb_weight=d.get("vlb_weight", 0.0) if learns_variance(config) else 0.0)
  if not conditional(config):
    return step

  def labelled_step(state: Any, batch: tuple[jax.Array, jax.Array], key: jax.Array, axis_name: Optional[str] = None):
    images_, labels = batch
    return step(state, images_, key, labels=labels, cond_drop_prob=d.cond_drop_prob, axis_name=axis_name)
  return labelled_step


def sampler_options(config: ml_collections.ConfigDict, **overrides: Any) -> sampling.SamplerOptions:
  """The sampler settings of config.sample (fields overridable), with the run's prediction target."""
  given = {k: v for k, v in overrides.items() if v is not None}
  s = {**config.sample, **given}
  # ddpm runs all T steps: the config's step count (for its own sampler) does not apply unless given here.
  steps = s["num_steps"] if s["method"] != "ddpm" or "num_steps" in given else None
  return sampling.SamplerOptions(method=s["method"], num_steps=steps, eta=s["eta"], clip_x0=s["clip_x0"],
                                 variance=s["variance"], timestep_spacing=s.get("timestep_spacing", "leading"),
                                 prediction=config.diffusion.get("prediction", "eps"),
                                 guidance_scale=s.get("guidance_scale", 1.0))


def validate(config: ml_collections.ConfigDict, *, device_count: int = 1, process_count: int = 1,
             stop_at_step: Optional[int] = None) -> None:
  """Raises ValueError for any config value a run cannot use, before anything is compiled or written."""
  missing = [key for key in REQUIRED if key not in config]
  if missing:
    raise ValueError(f"config has no {missing[0]!r}: every config needs {', '.join(REQUIRED)}")
  for key in ("batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "image_size",
              "keep_checkpoints", "eval_num_samples", "eval_batch_size", "fid_num_real",
              "sample.num_samples", "sample.batch_size"):
    _positive_int(config, key)
  if stop_at_step is not None and stop_at_step < 1:
    raise ValueError(f"stop_at_step={stop_at_step!r} is invalid: it must be >= 1")
  data.parse_dataset(config.dataset)
  _choice("parallelism", config.parallelism, parallel.MODES)
  if config.batch_size % device_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {device_count} devices: "
                     f"use a multiple of {device_count}")
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {process_count} processes")
  _choice("data.channels", config.data.channels, (1, 3))
  with _section("data"):
    data.check_worker_count(config.data.worker_count)
  reporting.check_wandb(config.wandb.project)
  model = build_model(config)
  model.validate((1,) + image_shape(config))
  if model.attention == "cudnn" and not cudnn_attention_runs(model.dtype):
    raise ValueError(f"model.attention='cudnn' needs a GPU with cuDNN and model.dtype bfloat16 or float16, and this "
                     f"run has {jax.default_backend()} devices and model.dtype={np.dtype(model.dtype).name}: use auto "
                     "(cuDNN's kernel where it applies) or xla")
  schedule = build_schedule(config)
  build_optimizer(config)
  _choice("diffusion.loss", config.diffusion.loss, diffusion.LOSSES)
  _choice("diffusion.prediction", config.diffusion.prediction, diffusion.PREDICTIONS)
  _choice("diffusion.loss_weighting", config.diffusion.loss_weighting, diffusion.LOSS_WEIGHTINGS)
  if not config.diffusion.min_snr_gamma > 0:
    raise ValueError(f"diffusion.min_snr_gamma={config.diffusion.min_snr_gamma!r} is invalid: it must be > 0")
  cond_drop = config.diffusion.get("cond_drop_prob", 0.0)
  if not 0.0 <= cond_drop <= 1.0:
    raise ValueError(f"diffusion.cond_drop_prob={cond_drop!r} is invalid: it must lie in [0, 1]")
  vlb_weight = config.diffusion.get("vlb_weight", 0.0)
  if not vlb_weight >= 0.0:
    raise ValueError(f"diffusion.vlb_weight={vlb_weight!r} is invalid: it must be >= 0")
  if learns_variance(config) and not vlb_weight > 0.0:
    raise ValueError(f"diffusion.vlb_weight={vlb_weight!r} leaves the variance of model.learn_variance=True "
                     "untrained: use a weight > 0 (0.001, Nichol & Dhariwal's)")
  nll_images = nll_num_images(config)
  if isinstance(nll_images, bool) or not isinstance(nll_images, int) or nll_images < 0:
    raise ValueError(f"eval.nll_num_images={nll_images!r} is invalid: use 0 (off) or a number of images")
  if nll_images and not config.eval_every_steps:
    raise ValueError(f"eval.nll_num_images={nll_images} needs eval_every_steps > 0: the bound is computed with the "
                     "other evaluations")
  if not 0.0 <= config.ema.decay < 1.0:
    raise ValueError(f"ema.decay={config.ema.decay!r} is invalid: it must lie in [0, 1) (0 keeps no average)")
  validate_sampler(sampler_options(config), schedule.num_timesteps, "sample.")
  for key in ("sample.every_steps", "eval_every_steps"):
    section, _, name = key.rpartition(".")
    value = (config[section] if section else config)[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"{key}={value!r} is invalid: use 0 (off) or a number of steps")
  if config.eval_every_steps and config.dataset != "digits":
    inception.check_weights_path(config.inception_weights or "")


def nll_num_images(config: ml_collections.ConfigDict) -> int:
  """How many evaluation images the training run's likelihood hook takes (0: off; configs older than the key: 0)."""
  return (config.get("eval") or {}).get("nll_num_images", 0)


def validate_sampler(options: sampling.SamplerOptions, num_timesteps: int, prefix: str = "") -> None:
  """Raises ValueError for sampler settings that `sampling.sample` would refuse, naming them with `prefix`."""
  with _section(prefix.rstrip(".")) if prefix else contextlib.nullcontext():
    sampling.check_options(options, num_timesteps)


def model_fn(model: UNet) -> Callable[..., jax.Array]:
  """(params, x_t, t[, labels]) -> the network's output."""
  return lambda params, x, t, labels=None: model.apply({"params": params}, x, t, labels=labels)


def call_batch(config: ml_collections.ConfigDict, batch_size: Optional[int], count: Optional[int]) -> int:
  """Images per compiled call: `batch_size`, else the config's sampler batch size, but no more than `count` (the
  images the calls are for, when known): 2 samples are not drawn as a batch of 256."""
  batch = batch_size or config.sample.batch_size
  return min(batch, count) if count else batch


def build_generator(config: ml_collections.ConfigDict, model: UNet, schedule: Schedule,
                    options: sampling.SamplerOptions, batch_size: Optional[int] = None,
                    num_samples: Optional[int] = None) -> Callable[..., np.ndarray]:
  """sampling.make_generator for the config's image shape, in batches of call_batch (num_samples: the most samples
  one generate call asks for)."""
  return sampling.make_generator(model_fn(model), schedule, image_shape(config), options,
                                 batch_size=call_batch(config, batch_size, num_samples))


def build_source(config: ml_collections.ConfigDict) -> data.Source:
  """The dataset the config names (every process reads it at random; a folder as process 0 lists it); raises
  ValueError when it cannot be read."""
  kind, root = data.parse_dataset(config.dataset)
  if kind == "folder":
    return data.folder_source(root, data.unpack_listing(consensus.decide(
        "folder listing", lambda: data.pack_listing(data.list_images(root)))))
  return data.make_source(config.dataset, data_dir=config.data.data_dir, split=config.data.split)


def build_batches(config: ml_collections.ConfigDict, source: data.Source, process_index: int = 0,
                  process_count: int = 1) -> Callable[[int], Iterator[np.ndarray]]:
  """start_step -> this process's training batches from that step on."""
  return lambda start: data.batch_stream(
      source, seed=config.seed, global_batch=config.batch_size, image_size=config.image_size,
      channels=config.data.channels, random_flip=config.data.random_flip, start_step=start,
      process_index=process_index, process_count=process_count, labels=conditional(config),
      worker_count=config.data.worker_count)


def build_evaluator(config: ml_collections.ConfigDict, workdir: str,
                    source: Optional[data.Source] = None) -> Evaluator:
  """The digits judge for the embedded digits, Inception FID / KID / IS against `source` (default: the config's
  dataset, read now) for any other dataset."""
  if config.dataset == "digits":
    return evaluation.digits_evaluator(workdir, config.seed)
  source = source or build_source(config)
  num_real = min(config.fid_num_real, source.size)
  real = lambda: data.batch_stream(source, seed=0, global_batch=config.eval_batch_size, image_size=config.image_size,
                                   channels=config.data.channels, random_flip=False,
                                   worker_count=config.data.worker_count)
  path = evaluation.fid_stats_path(config.inception_weights, config.dataset, config.data.split, config.image_size,
                                   config.data.channels, num_real)
  return evaluation.inception_evaluator(config.inception_weights, real, num_real, path, config.eval_batch_size)


def build_nll_images(config: ml_collections.ConfigDict,
                     num_images: int) -> tuple[np.ndarray, Optional[np.ndarray], str]:
  """`num_images` evaluation images for the likelihood bound (data.evaluation_source; a seeded choice without
  repeats, quantised to 8 bits in [-1, 1]), their labels for a conditional model (else None), and which they are."""
  source, which = data.evaluation_source(config.dataset, data_dir=config.data.data_dir, split=config.data.split)
  if num_images > source.size:
    raise ValueError(f"{num_images} images were asked for the likelihood bound, more than the {source.size} of "
                     f"{which}")
  labelled = conditional(config)
  batch = next(data.batch_stream(source, seed=0, global_batch=num_images, image_size=config.image_size,
                                 channels=config.data.channels, random_flip=False, labels=labelled,
                                 worker_count=config.data.worker_count))
  images_, labels = batch if labelled else (batch, None)
  return evaluation.quantize(images_), labels, which + (", conditional on their labels" if labelled else "")


def build_bound_evaluator(config: ml_collections.ConfigDict, model: UNet, schedule: Schedule,
                          variance: Optional[str] = None, batch_size: Optional[int] = None,
                          num_images: Optional[int] = None) -> Callable[..., dict]:
  """likelihood.make_bound_evaluator for the config's model, with the run's variance (nll_variance), in batches of
  call_batch (num_images: the most images one call evaluates)."""
  return likelihood.make_bound_evaluator(model_fn(model), schedule, variance=nll_variance(config, variance),
                                         prediction=config.diffusion.prediction,
                                         batch_size=call_batch(config, batch_size, num_images))


def check_classes(config: ml_collections.ConfigDict, source: data.Source) -> None:
  """Raises ValueError unless a conditional model's class count is the dataset's."""
  n = config.model.get("num_classes") or 0
  if n and not source.num_classes:
    raise ValueError(f"model.num_classes={n} asks for a class-conditional model, but dataset={config.dataset!r} has "
                     "no class labels (labelled: digits, TFDS datasets with a 'label' feature, folders of one "
                     "subfolder per class)")
  if n and n != source.num_classes:
    raise ValueError(f"model.num_classes={n} but dataset={config.dataset!r} has {source.num_classes} classes: "
                     f"set model.num_classes={source.num_classes}")


def build_training(config: ml_collections.ConfigDict, workdir: str, stop_at_step: Optional[int] = None,
                   command: Sequence[str] = ()) -> loop.Training:
  """Validates the config and builds every part of its training run (its run record names `command`, the command
  line that started it); reads the dataset, writes nothing."""
  validate(config, device_count=jax.device_count(), process_count=jax.process_count(), stop_at_step=stop_at_step)
  preflight.check_workdir(workdir)
  source = build_source(config)  # a missing dataset fails before any JAX
  check_classes(config, source)
  model, schedule, tx = build_model(config), build_schedule(config), build_optimizer(config)
  init_key, train_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
  input_shape = (1,) + image_shape(config)
  loop_hooks = []
  if config.sample.every_steps or config.eval_every_steps:
    drawn = max(config.sample.num_samples if config.sample.every_steps else 0,
                config.eval_num_samples if config.eval_every_steps else 0)
    generate = build_generator(config, model, schedule, sampler_options(config), num_samples=drawn)
    num_classes = model.num_classes
    loop_hooks.append(loop.Hook("samples", config.sample.every_steps, hooks.sample_grid_hook(
        workdir, generate, sample_key, config.sample.num_samples, num_classes)))
    if config.eval_every_steps:
      # Process 0 alone scores samples (and computes any FID reference statistics, once); the others wait at the
      # loop's barrier.
      evaluate = build_evaluator(config, workdir, source) if jax.process_index() == 0 else None
      loop_hooks.append(loop.Hook("eval", config.eval_every_steps, hooks.eval_hook(
          generate, evaluate, sample_key, config.eval_num_samples, num_classes)))
  if nll_num_images(config):
    lead = jax.process_index() == 0  # process 0 alone computes the bound
    nll_data = build_nll_images(config, nll_num_images(config)) if lead else (None, None, "")
    bound = build_bound_evaluator(config, model, schedule, num_images=nll_num_images(config))
    loop_hooks.append(loop.Hook("nll", config.eval_every_steps, hooks.nll_hook(
        bound, *nll_data[:2], jax.random.fold_in(sample_key, 1), nll_data[2])))
  runner = parallel.make_runner(build_train_step(config, schedule), config.parallelism)
  # process 0 alone writes the run record (describing it runs git and reads every installed package's version)
  record = run_record.describe(config=config.to_dict(), dataset=source.identity, parallelism=runner.mode,
                               command=command) if jax.process_index() == 0 else None
  return loop.Training(
      # Created in the runner's shardings: each device computes its own shards, no host holds the state.
      create_state=lambda: create_train_state(model, tx, init_key, input_shape, runner.state_shardings),
      runner=runner,
      batches=build_batches(config, source, jax.process_index(), jax.process_count()),
      key=train_key,
      end_step=min(config.num_train_steps, stop_at_step or config.num_train_steps),
      batch_size=config.batch_size,
      log_every=config.log_every_steps,
      checkpoint_every=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints,
      config=config.to_dict(),
      parameter_meaning=parameter_meaning,
      hooks=tuple(loop_hooks),
      wandb_project=config.wandb.project,
      class_names=source.class_names if conditional(config) else (),
      record=record)


@contextlib.contextmanager
def _naming_intact(workdir: str, ema: bool) -> Iterator[None]:
  """A CheckpointReadError raised inside, with the workdir's intact checkpoints (intact_hint) added to its message."""
  try:
    yield
  except checkpoint.CheckpointReadError as e:
    raise checkpoint.CheckpointReadError(f"{e}; {intact_hint(workdir, ema)}") from None


def load_run_config(workdir: str, step: Optional[int] = None,
                    ema: bool = True) -> tuple[ml_collections.ConfigDict, int]:
  """The config saved with a workdir's checkpoint (the latest, or `step`) and that step; a config that cannot be read
  raises CheckpointReadError naming the checkpoints whose config and EMA (or raw) parameters can be."""
  with _naming_intact(workdir, ema):
    saved, step = checkpoint.load_config(workdir, step)
  return ml_collections.ConfigDict(saved), step


def _params_template(config: ml_collections.ConfigDict) -> Any:
  """The shapes and dtypes of the config's model parameters (nothing is computed)."""
  model = build_model(config)
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1,) + image_shape(config)))


def restore_sampling_params(config: ml_collections.ConfigDict, workdir: str, step: int, ema: bool = True) -> Any:
  """Only the EMA (or raw) parameters of a workdir's checkpoint `step`, for the config's model.

  A checkpoint that cannot be read raises CheckpointError naming the intact
  steps that could be used instead.
  """
  manager = checkpoint.make_manager(workdir, create=False)
  try:
    with _naming_intact(workdir, ema):
      return checkpoint.restore_params(manager, _params_template(config), step, ema=ema)
  finally:
    manager.close()


def intact_hint(workdir: str, ema: bool = True) -> str:
  """'intact: S, ... (use --checkpoint ...)': the checkpoints of a workdir whose config and EMA (or raw) parameters
  can be read, newest first, or that none can."""
  manager = checkpoint.make_manager(workdir, create=False)

  def restore(step: int) -> None:
    config = ml_collections.ConfigDict(checkpoint.saved_config(manager, step))
    checkpoint.restore_params(manager, _params_template(config), step, ema=ema)
  try:
    good = checkpoint.intact_steps(manager, restore)
  finally:
    manager.close()
  return (f"intact: {', '.join(map(str, good))} (use --checkpoint {checkpoint.checkpoint_dir(workdir)}/{good[0]})"
          if good else "no checkpoint of this run can be read")
