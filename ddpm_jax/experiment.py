"""A training run from a config: validation, the step loop, metrics, checkpoints, preemption, sample grids."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax.jax_utils
import jax
import numpy as np
from absl import logging

from ddpm_jax import checkpoint, data, diffusion, images, sampling
from ddpm_jax.schedule import Schedule, make_schedule
from ddpm_jax.train_state import TrainState, create_train_state
from ddpm_jax.training import make_optimizer, make_train_step
from ddpm_jax.unet import unet_from_config


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint."""

  def __init__(self, step: int, signum: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved")
    self.step, self.signum = step, signum


def _positive_int(config, key: str) -> None:
  """Raises unless config[key] is an integer >= 1."""
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{key}={value!r} is invalid: it must be an integer >= 1")


def schedule_from_config(config) -> Schedule:
  """The diffusion schedule a config names."""
  d = config.diffusion
  return make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def validate_config(config, device_count: int) -> None:
  """Raises ValueError for any config value the run cannot use, before anything is compiled."""
  for key in ("seed", "batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "image_size",
              "dataset"):
    if key not in config:
      raise ValueError(f"config has no {key!r}: every config needs seed, batch_size, num_train_steps, "
                       "checkpoint_every_steps, log_every_steps, image_size and dataset")
  for key in ("batch_size", "num_train_steps", "checkpoint_every_steps", "log_every_steps", "image_size"):
    _positive_int(config, key)
  data.parse_dataset(config.dataset)
  if config.batch_size % device_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {device_count} devices: "
                     f"use a multiple of {device_count}")
  if config.data.channels not in (1, 3):
    raise ValueError(f"data.channels={config.data.channels!r} is invalid: use 1 (grayscale) or 3 (RGB)")
  unet_from_config(config.model).validate((1, config.image_size, config.image_size, config.data.channels))
  schedule_from_config(config)
  make_optimizer(config.optim, config.num_train_steps)
  if config.diffusion.loss not in diffusion.LOSSES:
    raise ValueError(f"diffusion.loss={config.diffusion.loss!r} is unknown: choose one of "
                     f"{', '.join(diffusion.LOSSES)}")
  if config.get("eval_every_steps", 0) and config.dataset != "digits":
    from ddpm_jax import inception  # pylint: disable=g-import-not-at-top

    inception.check_weights_path(config.get("inception_weights") or "")
  if not 0.0 <= config.ema.decay < 1.0:
    raise ValueError(f"ema.decay={config.ema.decay!r} is invalid: it must lie in [0, 1) (0 keeps no average)")
  s = config.sample
  if s.method not in sampling.METHODS or s.variance not in sampling.VARIANCES:
    raise ValueError(f"sample.method={s.method!r} / sample.variance={s.variance!r}: methods are "
                     f"{', '.join(sampling.METHODS)}, variances {', '.join(sampling.VARIANCES)}")


def sampler_kwargs(config, **overrides) -> dict[str, Any]:
  """The keyword arguments of sampling.sample that config.sample (with overrides) describes."""
  s = {**dict(config.sample), **overrides}
  return dict(method=s["method"], num_steps=s["num_steps"] if s["method"] == "ddim" else None, eta=s["eta"],
              clip_x0=s["clip_x0"], variance=s["variance"])


def sample_from_config(config, apply_fn, params, schedule: Schedule, key: jax.Array, num_samples: int,
                       batch_size: Optional[int] = None, progress=None, **overrides) -> np.ndarray:
  """[num_samples, H, W, C] float samples in [-1, 1] with the config's sampler (fields overridable)."""
  eps = lambda p, x, t: apply_fn({"params": p}, x, t)
  shape = (config.image_size, config.image_size, config.data.channels)
  return sampling.generate(eps, params, schedule, key, num_samples, shape,
                           batch_size=batch_size or config.sample.batch_size, progress=progress,
                           **sampler_kwargs(config, **overrides))


def load_state(path: str, config=None) -> tuple[Any, TrainState]:
  """(config, TrainState) restored from a workdir's latest checkpoint or a WORKDIR/checkpoints/STEP folder.

  Without `config` the one saved with the checkpoint is used; a given config
  whose model or optimizer differs from the checkpoint's is a ValueError.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  workdir, step = checkpoint.locate(path)
  config = config or ml_collections.ConfigDict(checkpoint.load_config(workdir, step))
  shape = (1, config.image_size, config.image_size, config.data.channels)
  template = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0), shape))
  manager = checkpoint.make_manager(workdir, create=False)
  try:
    state, _ = checkpoint.restore(manager, template, step)
  finally:
    manager.close()
  return config, state


def _eta(seconds: float) -> str:
  """Seconds as h:mm:ss."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_printer(what: str, every: int = 1) -> Callable[[int, int], None]:
  """A callback (done, total) printing progress, items/s and ETA on every `every`-th call and the last."""
  start, calls = time.time(), itertools.count()

  def report(done: int, total: int) -> None:
    if next(calls) % every == 0 or done >= total:
      rate = done / max(time.time() - start, 1e-9)
      print(f"{what} {done}/{total} | {rate:.1f}/s | ETA {_eta((total - done) / max(rate, 1e-9))}", flush=True)
  return report


def _inception_scores(config, samples: np.ndarray) -> dict[str, Any]:
  """FID, KID and IS of samples against the dataset's real statistics (cached beside the Inception weights)."""
  from ddpm_jax import inception  # pylint: disable=g-import-not-at-top

  weights = config.get("inception_weights") or ""
  variables = inception.load_variables(weights)
  extractor = inception.make_extractor(variables)
  batch = config.get("eval_batch_size", 100)
  source = data.make_source(config.dataset, data_dir=config.data.data_dir, split=config.data.split,
                            download=config.data.download)
  num_real = min(config.get("fid_num_real", 50_000), source.size)
  slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{config.dataset}_{config.data.split}").strip("_")
  path = os.path.join(os.path.dirname(os.path.abspath(weights)), "fid_stats",
                      f"{slug}_{config.image_size}px_{config.data.channels}ch_{num_real}.npz")

  def real_features() -> np.ndarray:
    print(f"computing Inception statistics of {num_real} real images into {path}", flush=True)
    stream = data.batch_stream(source, seed=0, global_batch=batch, image_size=config.image_size,
                               channels=config.data.channels, random_flip=False)
    real = (b.reshape((-1,) + b.shape[2:]) for b in stream)
    return inception.reference_features(extractor, real, num_real, progress_printer("real images", every=10))

  reference = inception.cached_reference(path, real_features, inception.weights_fingerprint(weights))
  return inception.score(extractor, samples, reference, batch)


def evaluate_samples(config, workdir: str, samples: np.ndarray) -> dict[str, Any]:
  """Sample-quality numbers: the offline classifier for the embedded digits, Inception FID/KID/IS otherwise."""
  if config.dataset == "digits":
    from ddpm_jax import digits_eval  # pylint: disable=g-import-not-at-top

    return {"evaluator": "digits",
            **digits_eval.evaluate(digits_eval.load_or_train(workdir, config.seed), samples, config.seed)}
  return {"evaluator": "inception", **_inception_scores(config, samples)}


def eval_report(result: dict[str, Any]) -> str:
  """One human-readable line of an evaluate_samples() result."""
  from ddpm_jax import digits_eval, inception  # pylint: disable=g-import-not-at-top

  return (digits_eval.report if result["evaluator"] == "digits" else inception.report)(result)


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl and TensorBoard event files."""

  def __init__(self, workdir: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    self._tf = tf
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Records scalars at step."""
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    with self._tb.as_default():
      for k, v in scalars.items():
        self._tf.summary.scalar(k, v, step=step)
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes both files."""
    self._jsonl.close()
    self._tb.close()


def prefetch(iterator: Iterator[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
  """Yields put(item) while the next `size` - 1 items are already being transferred."""
  queue: collections.deque = collections.deque()
  for item in iterator:
    queue.append(put(item))
    if len(queue) == size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _check_finite(rows: list[tuple[int, dict]]) -> None:
  """Raises FloatingPointError naming the first step whose loss is NaN or Inf."""
  for step, m in rows:
    if not np.isfinite(m["loss"]):
      raise FloatingPointError(f"loss is {m['loss']} at step {step}: training stopped; the latest checkpoint "
                               "predates it (try a lower optim.learning_rate or optim.grad_clip_norm=1.0)")


def _periodic_samples(config, workdir: str, step: int, last: bool, ema_params: Callable[[], Any], apply_fn,
                      schedule: Schedule, key: jax.Array, writer: MetricWriter) -> None:
  """At the configured intervals (and the last step) writes a sample grid and logs sample-quality metrics."""
  due = lambda every: every and (step % every == 0 or last)
  if due(config.sample.every_steps):
    samples = sample_from_config(config, apply_fn, ema_params(), schedule, key, config.sample.num_samples)
    images.save_samples(os.path.join(workdir, "samples", f"step_{step:08d}.png"), samples)
  if due(config.get("eval_every_steps", 0)):
    samples = sample_from_config(config, apply_fn, ema_params(), schedule, key, config.eval_num_samples)
    result = evaluate_samples(config, workdir, samples)
    writer.write(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
    print(f"eval at step {step}: {eval_report(result)}", flush=True)


def train_and_evaluate(config, workdir: str, stop_at_step: Optional[int] = None) -> TrainState:
  """Trains (resuming from workdir's latest checkpoint) until config.num_train_steps or stop_at_step."""
  validate_config(config, jax.device_count())
  if stop_at_step is not None and stop_at_step < 1:
    raise ValueError(f"stop_at_step={stop_at_step!r} is invalid: it must be >= 1")
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  schedule = schedule_from_config(config)
  init_key, train_key, sample_key = jax.random.split(jax.random.key(config.seed), 3)
  input_shape = (1, config.image_size, config.image_size, config.data.channels)
  manager = checkpoint.make_manager(workdir, config.get("keep_checkpoints", 3))
  if manager.latest_step() is None:
    state = create_train_state(config, init_key, input_shape)
  else:  # restore into the shapes alone: no initialisation to compile
    template = jax.eval_shape(lambda: create_train_state(config, init_key, input_shape))
    state, _ = checkpoint.restore(manager, template)
    logging.info("resumed from the checkpoint of step %d in %s", int(state.step), manager.directory)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
  start = int(state.step)
  end = min(config.num_train_steps, stop_at_step or config.num_train_steps)
  if start >= end:
    logging.info("nothing to do: the checkpoint is at step %d, the run ends at step %d", start, end)
    return state

  source = data.make_source(config.dataset, data_dir=config.data.data_dir, split=config.data.split,
                            download=config.data.download, process_index=jax.process_index(),
                            process_count=jax.process_count())
  stream = data.batch_stream(source, seed=config.seed, global_batch=config.batch_size, image_size=config.image_size,
                             channels=config.data.channels, random_flip=config.data.random_flip, start_step=start,
                             num_devices=jax.local_device_count(), process_index=jax.process_index(),
                             process_count=jax.process_count(), shuffle_buffer=config.data.shuffle_buffer)
  use_pmap = jax.device_count() > 1
  batches = (flax.jax_utils.prefetch_to_device(stream, 2) if use_pmap
             else prefetch((b[0] for b in stream), jax.device_put))
  step_fn = make_train_step(config, schedule, use_pmap)
  run_state = flax.jax_utils.replicate(state) if use_pmap else state
  host_state = lambda s: jax.device_get(flax.jax_utils.unreplicate(s) if use_pmap else s)
  config_json = config.to_json()

  received: list[int] = []
  handlers = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      handlers[sig] = signal.signal(sig, lambda signum, _: received.append(signum))
  writer = MetricWriter(workdir) if lead else None
  pending: list[tuple[int, Any]] = []
  t_last, n_last = time.time(), start
  logging.info("training %s from step %d to %d on %d device(s) in %d process(es), global batch %d", config.dataset,
               start, end, jax.device_count(), jax.process_count(), config.batch_size)
  try:
    for step in range(start, end):
      run_state, metrics = step_fn(run_state, next(batches), train_key)
      done = step + 1
      pending.append((done, metrics))
      if step == start:
        jax.block_until_ready(metrics)
        logging.info("first step (compile included) took %.1f s", time.time() - t_last)
        t_last = time.time()
        n_last = done
      stop = bool(received)
      log_now = done % config.log_every_steps == 0 or done == end
      save_now = done % config.checkpoint_every_steps == 0 or done == end or stop
      if log_now or save_now:
        rows = [(s, {k: float(np.ravel(v)[0]) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        _check_finite(rows)
        if log_now and lead:
          now = time.time()
          rate = (done - n_last) / max(now - t_last, 1e-9)
          t_last, n_last = now, done
          mean = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}
          writer.write(done, {**mean, "steps_per_s": rate, "images_per_s": rate * config.batch_size})
          print(f"step {done}/{end} | loss {mean['loss']:.4f} | grad_norm {mean['grad_norm']:.3f} | "
                f"lr {mean['lr']:.2e} | {rate:.2f} steps/s, {rate * config.batch_size:.0f} img/s | "
                f"ETA {_eta((end - done) / max(rate, 1e-9))}", flush=True)
      if save_now:
        checkpoint.save(manager, host_state(run_state), config_json)
      if lead:
        _periodic_samples(config, workdir, done, done == end, lambda: host_state(run_state).ema_params,
                          state.apply_fn, schedule, sample_key, writer)
      if stop:
        manager.wait_until_finished()
        raise Interrupted(done, received[0])
  finally:
    batches = stream = None  # finalize the tf.data iterator now, not during interpreter shutdown
    manager.wait_until_finished()
    manager.close()
    if writer:
      writer.close()
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
  return host_state(run_state)
