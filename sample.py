"""Draws samples from a trained workdir: `python sample.py --workdir runs/default --num_samples 64 --out s.png`."""

import dataclasses
import functools
import json
import os
import sys
from typing import Callable

from ddpm_jax import runtime

# Before the imports below (seconds): a signal while they load, compile or sample ends the process with one line (in
# the main process only, as in train.py).
if __name__ == "__main__":
  runtime.stop_on_signals("sample.py")
elif __name__ == "__mp_main__":  # a worker process, importing this file first of all
  runtime.leave_signals_to_the_main_process()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from ddpm_jax import (builders, checkpoint, cli, data, evaluation, figures, images, likelihood, loop, plots,
                      preflight, run_record, sampling)
from ddpm_jax.reporting import progress_printer
from ddpm_jax.schedule import Schedule
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run: its latest checkpoint is used.")
flags.DEFINE_string("checkpoint", None, "A checkpoint step folder (WORKDIR/checkpoints/STEP) instead of --workdir.")
cli.define_config_flag("sample.py", None, "Optional config; by default the one saved with the checkpoint.")
flags.DEFINE_integer("num_samples", 64, "How many samples to draw.")
flags.DEFINE_integer("batch_size", None, "Samples (or --nll images) per batch, split over the devices; default "
                     "config.sample.batch_size, at most --num_samples (--nll).")
flags.DEFINE_enum("method", None, list(sampling.METHODS), "Sampler; default config.sample.method.")
flags.DEFINE_integer("steps", None, "Model calls of ddim / dpmpp_2m (default config.sample.num_steps) or of ddpm "
                     "(default all T; fewer respace the chain as Improved DDPM does).")
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1]; default config.sample.eta.")
flags.DEFINE_enum("timestep_spacing", None, list(sampling.SPACINGS),
                  "Timesteps of ddim / dpmpp_2m; default config.sample.timestep_spacing.")
flags.DEFINE_string("compilation_cache", runtime.default_cache_dir(), "Folder of XLA's persistent compilation "
                    "cache (shared with train.py); '' turns it off.")
flags.DEFINE_integer("seed", 0, "Sample i depends only on (seed, i).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters (false: the raw ones).")
flags.DEFINE_string("out", "samples.png", "PNG grid path; the uint8 NHWC array goes beside it as .npz.")
flags.DEFINE_integer("scale", None, "Enlarge each image of the grid and figures by this integer factor "
                     "(default: the smallest reaching 64 pixels a side; 1: as they are).")
flags.DEFINE_bool("plot", False, "Only draw the training curves of --workdir's metrics.jsonl into "
                  "WORKDIR/curves.png (loss raw and smoothed, learning rate, evaluation metrics).")
flags.DEFINE_bool("figures", False, "Also write the book's figures: forward diffusion, 10 samples, a trajectory.")
flags.DEFINE_bool("eval", False, "Score the samples (digits: classifier confidence, class balance, feature "
                  "Fréchet distance; other datasets: FID, KID, IS) and write WORKDIR/eval_step_STEP.json.")
flags.DEFINE_string("labels", None, "Classes to draw, for a class-conditional model: one ('7'), a list ('0,3,9') or "
                    "'all'; the samples are shared out in that order, one class per grid row.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale w for --labels (0: unconditional, 1: "
                   "conditional, > 1: guided); default config.sample.guidance_scale.")
flags.DEFINE_bool("deterministic", False, "Deterministic GPU kernels and full float32 matmul and convolution "
                  "precision (no TF32 / bf16 passes): slower; see docs/reproducibility.md.")
flags.DEFINE_integer("nll", 0, "Instead of sampling, compute the variational bound in bits/dim on this many "
                     "evaluation images (the test split where the dataset has one, else the training images); "
                     "with --out, also write it as JSON beside it (same stem, .json).")
flags.DEFINE_enum("variance", None, list(sampling.VARIANCES), "Fixed variance of ddpm and of --nll; default "
                  "config.sample.variance (a model that learns its variances uses them).")
flags.DEFINE_string("inception_weights", None, "FID Inception weights (tools/convert_inception_weights.py) for "
                    "--eval on datasets other than digits; overrides the config's inception_weights.")


def requested_labels(spec: str | None, guidance: float | None, config: ml_collections.ConfigDict,
                     num_samples: int) -> tuple[np.ndarray | None, int | None]:
  """(labels, grid columns) that --labels asks of the model (None, None without it); ValueError for classes the
  model does not have, or for --labels / --guidance on an unconditional model."""
  num_classes = config.model.get("num_classes") or 0
  if spec is None:
    if guidance is not None:
      raise ValueError(f"--guidance={guidance:g} needs --labels: guidance steers samples towards a class")
    return None, None
  if not num_classes:
    raise ValueError(f"--labels={spec} needs a class-conditional model: this checkpoint's model is unconditional "
                     "(model.num_classes=0; train one with --config configs/digits_guided.py)")
  if spec == "all":
    classes = list(range(num_classes))
  else:
    try:
      classes = [int(c) for c in spec.split(",")]
    except ValueError:
      raise ValueError(f"--labels={spec} is not understood: give a class (7), a list (0,3,9) or 'all'") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
      raise ValueError(f"--labels={spec}: class {bad[0]} does not exist: the model has classes 0..{num_classes - 1}")
  return images.class_rows(classes, num_samples)


def check_out(path: str) -> None:
  """Raises ValueError unless --out names a .png file that, with its .npz beside it, can be written: no folder of
  that name, in a folder that is writable or can be made."""
  if os.path.splitext(path)[1].lower() != ".png":
    raise ValueError(f"--out={path!r} is not a .png path: the grid is written as PNG (the samples beside it as "
                     ".npz); give e.g. --out=samples.png")
  for target in (path, os.path.splitext(path)[0] + ".npz"):
    if os.path.isdir(target):
      raise ValueError(f"--out={path!r} cannot be written: {target!r} is a folder; give a file path")
  folder = os.path.dirname(os.path.abspath(path))
  preflight.check_folder(folder, f"--out={path!r} cannot be written: {folder!r}")


def check_options() -> None:
  """Raises ValueError for a flag value sample.py cannot use, before anything is read or compiled."""
  if FLAGS.num_samples < 1:
    raise ValueError(f"--num_samples={FLAGS.num_samples} is invalid: it must be >= 1")
  if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size={FLAGS.batch_size} is invalid: it must be >= 1 (or leave it out: the config's "
                     "sample.batch_size)")
  if FLAGS.scale is not None and FLAGS.scale < 1:
    raise ValueError(f"--scale={FLAGS.scale} is invalid: it must be >= 1 (or leave it out: enlarged to 64 pixels)")
  if FLAGS.nll < 0:
    raise ValueError(f"--nll={FLAGS.nll} is invalid: give a number of images (0: sample instead)")
  if not FLAGS.nll:  # (with --nll, --out only names the JSON beside it)
    check_out(FLAGS.out)
  if FLAGS.checkpoint and os.path.basename(FLAGS.checkpoint.rstrip("/")) == "checkpoints":
    parent = os.path.dirname(FLAGS.checkpoint.rstrip("/")) or "."
    raise ValueError(f"--checkpoint={FLAGS.checkpoint} is a checkpoints folder, not one of its step folders: give "
                     f"--checkpoint {FLAGS.checkpoint.rstrip('/')}/STEP, or --workdir {parent} for the latest")


def likelihood_bound(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """--nll: the bound on --nll evaluation images in one line, and as JSON beside an --out that was given."""
  schedule, model = builders.build_schedule(config), builders.build_model(config)
  variance = builders.nll_variance(config, FLAGS.variance)
  nll_images, labels, which = builders.build_nll_images(config, FLAGS.nll)
  params = builders.restore_sampling_params(config, workdir, step, ema=FLAGS.use_ema)
  bound = builders.build_bound_evaluator(config, model, schedule, FLAGS.variance, FLAGS.batch_size, FLAGS.nll)
  print(f"bound on {FLAGS.nll} images ({which}) in batches of {bound.batch_size} with the "
        f"{'EMA' if FLAGS.use_ema else 'raw'} params of step {step}: {schedule.num_timesteps} terms each, "
        f"variance {variance}", flush=True)
  result = bound(params, nll_images, jax.random.key(FLAGS.seed), labels, progress_printer("bound: images"))
  summary = likelihood.summarize(result)
  print(likelihood.report(summary, f"{which}; variance {variance}"))
  if FLAGS["out"].present:
    path = epath.Path(os.path.splitext(FLAGS.out)[0] + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "data": which, "variance": variance, "step": step, "ema": FLAGS.use_ema,
                                "seed": FLAGS.seed}, indent=2), encoding="utf-8")
    print(f"wrote {path}")


def plot_curves(workdir: str) -> None:
  """--plot: the training curves of the workdir's metrics.jsonl, drawn into WORKDIR/curves.png."""
  preflight.check_readable(workdir)
  out = os.path.join(workdir, loop.CURVES)
  plots.plot_training_curves(os.path.join(workdir, "metrics.jsonl"), out)
  print(f"wrote {out}")


def sampling_config(workdir: str, step: int) -> tuple[ml_collections.ConfigDict, int]:
  """The config to sample with (the checkpoint's, or --config with the checkpoint's prediction target and any
  --inception_weights) and the checkpoint step."""
  saved, step = builders.load_run_config(workdir, step, FLAGS.use_ema)
  config = FLAGS.config or saved
  trained = saved.get("diffusion", {}).get("prediction", "eps")
  if config.diffusion.prediction != trained:  # the checkpoint knows what its network predicts
    print(f"sample.py: the checkpoint's network predicts {trained!r}; using that, not the --config's "
          f"{config.diffusion.prediction!r}", file=sys.stderr)
    with config.unlocked():
      config.diffusion.prediction = trained
  if FLAGS.inception_weights:
    with config.unlocked():  # a --config file's dict is locked
      config.inception_weights = FLAGS.inception_weights
  return config, step


def write_record(workdir: str, step: int, options: sampling.SamplerOptions) -> str:
  """Writes how the samples were made (checkpoint, seed, sampler, command, the training run) as JSON beside --out;
  returns its path."""
  record = os.path.splitext(FLAGS.out)[0] + ".json"
  made = {"workdir": workdir, "checkpoint_step": step, "ema": FLAGS.use_ema, "seed": FLAGS.seed,
          "num_samples": FLAGS.num_samples, "sampler": dataclasses.asdict(options), "labels": FLAGS.labels,
          "deterministic": runtime.is_deterministic(), "command": sys.argv,
          "run": run_record.run_of_step(run_record.read(workdir), step)}
  epath.Path(record).write_text(json.dumps(made, indent=2, default=str), encoding="utf-8")
  return record


def write_scores(result: dict, workdir: str, step: int, options: sampling.SamplerOptions,
                 labels: np.ndarray | None) -> None:
  """--eval: prints the samples' scores and writes them, with how the samples were made, to the workdir."""
  result.update(step=step, ema=FLAGS.use_ema, seed=FLAGS.seed, method=options.method, num_steps=options.num_steps,
                eta=options.eta, timestep_spacing=options.timestep_spacing, labels=FLAGS.labels,
                guidance_scale=None if labels is None else options.guidance_scale)
  path = os.path.join(workdir, f"eval_step_{step}.json")
  epath.Path(path).write_text(json.dumps(result, indent=2), encoding="utf-8")
  print(f"eval: {evaluation.report(result)}\nwrote {path}")


def write_figures(config: ml_collections.ConfigDict, x: np.ndarray, model_fn: Callable[..., jax.Array],
                  schedule: Schedule, key: jax.Array, options: sampling.SamplerOptions,
                  labels: np.ndarray | None) -> None:
  """--figures: the book's forward-diffusion, ten-sample and trajectory figures beside --out."""
  source = builders.build_source(config)
  real = next(data.batch_stream(source, seed=FLAGS.seed, global_batch=4, image_size=config.image_size,
                                channels=config.data.channels, random_flip=False))
  stem = os.path.splitext(FLAGS.out)[0]
  shown = figures.write_book_figures(stem, real, x, model_fn, schedule, key, options, FLAGS.scale, labels)
  print(f"wrote {stem}_forward.png (t = 0, 199, ..., 999), {stem}_ten.png and {stem}_trajectory.png "
        f"(t = {', '.join(map(str, shown))})")


def draw(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Draws --num_samples images with checkpoint `step` and writes the grid, the samples and their record; then
  --eval's scores and --figures."""
  labels, cols = requested_labels(FLAGS.labels, FLAGS.guidance, config, FLAGS.num_samples)
  options = builders.sampler_options(config, method=FLAGS.method, num_steps=FLAGS.steps, eta=FLAGS.eta,
                                     timestep_spacing=FLAGS.timestep_spacing, guidance_scale=FLAGS.guidance,
                                     variance=FLAGS.variance)
  schedule = builders.build_schedule(config)
  builders.validate_sampler(options, schedule.num_timesteps)
  evaluate = builders.build_evaluator(config, workdir) if FLAGS.eval else None
  params = builders.restore_sampling_params(config, workdir, step, ema=FLAGS.use_ema)
  model = builders.build_model(config)
  generate = builders.build_generator(config, model, schedule, options, FLAGS.batch_size, FLAGS.num_samples)
  key = jax.random.key(FLAGS.seed)
  guidance = "" if labels is None else f", classes {FLAGS.labels}, guidance {options.guidance_scale:g}"
  print(f"sampling {FLAGS.num_samples} images in batches of {generate.batch_size} at step {step} "
        f"({'EMA' if FLAGS.use_ema else 'raw'} params) with {options.method}{guidance}", flush=True)
  x = generate(params, key, FLAGS.num_samples, progress_printer("sampled"), labels=labels)
  png, npz = images.save_samples(FLAGS.out, x, cols, scale=FLAGS.scale, labels=labels)
  print(f"wrote {png}, {npz} and {write_record(workdir, step, options)}")
  if evaluate:
    write_scores(evaluate(x, labels), workdir, step, options, labels)
  if FLAGS.figures:
    write_figures(config, x, functools.partial(builders.model_fn(model), params), schedule, key, options, labels)


def main(argv):
  del argv
  runtime.quiet_backend_discovery()
  runtime.quiet_storage_retries()
  if FLAGS.deterministic:
    runtime.make_deterministic()  # before anything starts JAX's backends
  runtime.quiet_orbax()
  runtime.enable_compilation_cache(FLAGS.compilation_cache)
  with cli.one_line_errors("sample.py"):
    if not (FLAGS.workdir or FLAGS.checkpoint):
      raise ValueError("give --workdir (latest checkpoint) or --checkpoint WORKDIR/checkpoints/STEP")
    if FLAGS.plot:
      plot_curves(checkpoint.locate(FLAGS.checkpoint or FLAGS.workdir)[0])
      return
    check_options()  # before anything is read
    workdir, step = checkpoint.locate(FLAGS.checkpoint or FLAGS.workdir)
    preflight.check_readable(workdir)
    if FLAGS.eval:  # eval_step_STEP.json goes into the workdir
      preflight.check_workdir(workdir)
    config, step = sampling_config(workdir, step)
    if FLAGS.nll:
      likelihood_bound(config, workdir, step)
    else:
      draw(config, workdir, step)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("sample.py", None))
