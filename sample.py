"""Draws samples from a trained workdir: `python sample.py --workdir runs/default --num_samples 64 --out samples.png`."""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run: its latest checkpoint is used.")
flags.DEFINE_string("checkpoint", None, "A checkpoint step folder (WORKDIR/checkpoints/STEP) instead of --workdir.")
config_flags.DEFINE_config_file("config", None, "Optional config; by default the one saved with the checkpoint.")
flags.DEFINE_integer("num_samples", 64, "How many samples to draw.")
flags.DEFINE_integer("batch_size", None, "Samples per batch (split over local devices); default config.sample.")
flags.DEFINE_enum("method", None, ["ddpm", "ddim"], "Sampler; default config.sample.method.")
flags.DEFINE_integer("steps", None, "DDIM steps; default config.sample.num_steps.")
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1]; default config.sample.eta.")
flags.DEFINE_integer("seed", 0, "Sample i depends only on (seed, i).")
flags.DEFINE_bool("use_ema", True, "Sample with the EMA parameters (false: the raw ones).")
flags.DEFINE_string("out", "samples.png", "PNG grid path; the uint8 NHWC array goes beside it as .npz.")
flags.DEFINE_bool("figures", False, "Also write the book's figures: forward diffusion, 10 samples, a trajectory.")
flags.DEFINE_bool("eval", False, "Score the samples (digits: classifier confidence, class balance, feature "
                  "Fréchet distance; other datasets: FID, KID, IS) and write WORKDIR/eval_step_STEP.json.")
flags.DEFINE_string("inception_weights", None, "FID Inception weights (tools/convert_inception_weights.py) for "
                    "--eval on datasets other than digits; overrides the config's inception_weights.")


def main(argv):
  del argv
  if FLAGS.eta is not None and not 0 <= FLAGS.eta <= 1:
    print(f"sample.py: error: --eta={FLAGS.eta} is out of range: it must lie in [0, 1]", file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.checkpoint import quiet_orbax_info  # pylint: disable=g-import-not-at-top

  quiet_orbax_info()

  from ddpm_jax import data, images  # pylint: disable=g-import-not-at-top
  from ddpm_jax.experiment import (eval_report, evaluate_samples, load_state, progress_printer,  # pylint: disable=g-import-not-at-top
                                   sample_from_config, sampler_kwargs, schedule_from_config)

  try:
    if not (FLAGS.workdir or FLAGS.checkpoint):
      raise ValueError("give --workdir (latest checkpoint) or --checkpoint WORKDIR/checkpoints/STEP")
    config, state = load_state(FLAGS.checkpoint or FLAGS.workdir, FLAGS.config)
    overrides = {k: v for k, v in (("method", FLAGS.method), ("num_steps", FLAGS.steps), ("eta", FLAGS.eta))
                 if v is not None}
    params = state.ema_params if FLAGS.use_ema else state.params
    schedule = schedule_from_config(config)
    key = jax.random.key(FLAGS.seed)
    print(f"sampling {FLAGS.num_samples} images at step {int(state.step)} ({'EMA' if FLAGS.use_ema else 'raw'} "
          f"params) with {overrides.get('method', config.sample.method)}", flush=True)
    x = sample_from_config(config, state.apply_fn, params, schedule, key, FLAGS.num_samples, FLAGS.batch_size,
                           progress=progress_printer("sampled"), **overrides)
    png, npz = images.save_samples(FLAGS.out, x)
    print(f"wrote {png} and {npz}")
    if FLAGS.eval:
      from ddpm_jax import checkpoint  # pylint: disable=g-import-not-at-top

      if FLAGS.inception_weights:
        with config.unlocked():  # a --config file's dict is locked; configs written before FID lack the key
          config.inception_weights = FLAGS.inception_weights
      workdir = checkpoint.locate(FLAGS.checkpoint or FLAGS.workdir)[0]
      result = evaluate_samples(config, workdir, x)
      result.update(step=int(state.step), ema=FLAGS.use_ema, seed=FLAGS.seed, **overrides)
      path = os.path.join(workdir, f"eval_step_{int(state.step)}.json")
      with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
      print(f"eval: {eval_report(result)}\nwrote {path}")
    if FLAGS.figures:
      source = data.make_source(config.dataset, data_dir=config.data.data_dir, split=config.data.split,
                                download=config.data.download)
      real = next(data.batch_stream(source, seed=FLAGS.seed, global_batch=4, image_size=config.image_size,
                                    channels=config.data.channels, random_flip=False))[0]
      stem = os.path.splitext(FLAGS.out)[0]
      eps = lambda x_t, t: state.apply_fn({"params": params}, x_t, t)
      shown = images.write_book_figures(stem, real, x, eps, schedule, key, sampler_kwargs(config, **overrides))
      print(f"wrote {stem}_forward.png (t = 0, 199, ..., 999), {stem}_ten.png and {stem}_trajectory.png "
            f"(t = {', '.join(map(str, shown))})")
  except ValueError as e:
    print(f"sample.py: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
