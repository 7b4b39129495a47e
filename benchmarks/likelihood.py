"""The time the variational bound takes: seconds per 1,000 images with all T terms (T model calls per image).

  python benchmarks/likelihood.py                       # the default config's model, random parameters
  python benchmarks/likelihood.py --workdir runs/default --num_images 1000 --json bound.json
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/likelihood.py  # a CPU's 2 cores as 2 devices

The bound is compiled once, on a first batch timed apart (compile_s); the
--num_images that follow are timed with progress shown. Without --workdir the
default config's model gets random parameters of its shapes: the time does not
depend on their values, and the bits/dim of such a model mean nothing (with
--workdir they are the run's, on its evaluation images). Each batch is split
over this process's devices; on a CPU, XLA_FLAGS can make each core a device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import default  # pylint: disable=g-import-not-at-top
from ddpm_jax import builders, checkpoint, likelihood  # pylint: disable=g-import-not-at-top
from ddpm_jax.reporting import progress_printer  # pylint: disable=g-import-not-at-top
from ddpm_jax.train_state import init_params  # pylint: disable=g-import-not-at-top


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="", help="a trained run (its latest checkpoint); default: the default config's "
                                               "model with random parameters")
  p.add_argument("--num_images", type=int, default=1000)
  p.add_argument("--batch_size", type=int, default=250)
  p.add_argument("--variance", default=None, help="fixed_small | fixed_large (default: the run's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  p.add_argument("--markdown", default="")
  args = p.parse_args(argv)
  if args.num_images < 2 or args.batch_size < 1:
    p.error("--num_images must be >= 2 and --batch_size >= 1")
  return args


def main(argv: list[str]) -> int:
  """Times the bound and prints the table."""
  args = parse_args(argv)
  if args.workdir:
    workdir, step = checkpoint.locate(args.workdir)
    config, step = builders.load_run_config(workdir, step)
    params = builders.restore_sampling_params(config, workdir, step)
    where = f"{workdir} step {step}"
  else:
    config = default.get_config()
    shapes = jax.eval_shape(lambda: init_params(builders.build_model(config), jax.random.key(0),
                                                (1,) + builders.image_shape(config)))
    rng = np.random.default_rng(args.seed)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
    where = "the default config's model, random parameters"
  schedule, model = builders.build_schedule(config), builders.build_model(config)
  images, labels, which = builders.build_nll_images(config, args.num_images)
  bound = builders.build_bound_evaluator(config, model, schedule, args.variance, args.batch_size)
  key = jax.random.key(args.seed)
  start = time.perf_counter()
  bound(params, images[:args.batch_size], key, None if labels is None else labels[:args.batch_size])
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  result = bound(params, images, key, labels, progress_printer("bound: images"))
  seconds = time.perf_counter() - start
  summary = likelihood.summarize(result)
  row = {"num_images": args.num_images, "batch_size": bound.batch_size, "num_timesteps": schedule.num_timesteps,
         "variance": builders.nll_variance(config, args.variance), "compile_s": compile_s,
         "seconds_per_1000": 1000 * seconds / args.num_images, "data": which, "model": where,
         "devices": jax.local_device_count(), **{k: v for k, v in summary.items() if k != "terms"}}
  device = f"{jax.local_devices()[0].device_kind}, {os.cpu_count()} cores"
  table = "\n".join([
      f"{where}; {which}; {device}.", "",
      "| images | T | variance | devices | compile + first batch (s) | s per 1,000 images | bits/dim |",
      "|" + " --- |" * 7,
      f"| {args.num_images} | {schedule.num_timesteps} | {row['variance']} | {row['devices']} | {compile_s:.1f} | "
      f"{row['seconds_per_1000']:.1f} | {summary['bits_per_dim']:.3f} ± {summary['standard_error']:.3f} |"]) + "\n"
  report.publish(table, row, args.json, args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
