"""Sample quality against cost for every sampler on one trained workdir: the sampler table of docs/results.md.

  python benchmarks/sampler_quality.py --workdir runs/default --num_samples 1000 --markdown table.md

Each row draws the same --num_samples samples (sample i depends only on
(--seed, i)) from the checkpoint's EMA parameters and scores them with the
workdir's evaluator (the digits judge for the embedded digits). The time is the
wall time of drawing them once the sampler is compiled (its compile time is
reported apart), per 1,000 samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)
import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top

from ddpm_jax import builders, checkpoint  # pylint: disable=g-import-not-at-top

SAMPLERS = [("ddpm", 1000)] + [("ddim", n) for n in (10, 20, 50, 100)] + [("dpmpp_2m", n) for n in (10, 15, 20, 25, 50)]


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a trained run (its latest checkpoint is used)")
  p.add_argument("--num_samples", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--samplers", default="", help="comma-separated method:steps (default: the ten of docs/results.md)")
  p.add_argument("--timestep_spacing", default=None, help="leading | trailing | linspace (default: the config's)")
  p.add_argument("--json", default="", help="write the rows here")
  p.add_argument("--markdown", default="", help="write the table here")
  args = p.parse_args(argv)
  try:
    args.samplers = ([(m, int(n)) for m, n in (s.split(":") for s in args.samplers.split(","))]
                     if args.samplers else SAMPLERS)
  except ValueError:
    p.error(f"--samplers={args.samplers!r} is invalid: use method:steps[,method:steps...], e.g. ddim:50,dpmpp_2m:20")
  if args.num_samples < 2:
    p.error(f"--num_samples={args.num_samples} is invalid: it must be >= 2")
  return args


def measure(config: ml_collections.ConfigDict, workdir: str, step: int, method: str, steps: int,
            args: argparse.Namespace, evaluate: Any) -> dict[str, Any]:
  """One row: the sampler's quality numbers, compile time and seconds per 1,000 samples."""
  schedule = builders.build_schedule(config)
  options = builders.sampler_options(config, method=method, num_steps=steps, timestep_spacing=args.timestep_spacing,
                                     eta=0.0 if method == "ddim" else None)
  builders.validate_sampler(options, schedule.num_timesteps)
  params = builders.restore_sampling_params(config, workdir, step)
  generate = builders.build_generator(config, builders.build_model(config), schedule, options)
  key = jax.random.key(args.seed)
  start = time.perf_counter()
  generate(params, key, min(args.num_samples, config.sample.batch_size))  # compile (and one batch)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  samples = generate(params, key, args.num_samples)
  seconds = time.perf_counter() - start
  result = evaluate(samples)
  row = {"method": method, "model_calls": steps, "compile_s": compile_s,
         "seconds_per_1000": 1000 * seconds / args.num_samples, **result}
  print(json.dumps(row), flush=True)
  return row


def markdown(rows: list[dict[str, Any]], step: int, device: str) -> str:
  """The rows as the table of docs/results.md."""
  lines = [f"Checkpoint step {step}; {rows[0]['num_samples']} samples per row; {device}.", "",
           "| sampler | model calls | confident (>= 0.9) | class range | feature Fréchet distance | ratio to the "
           "real-vs-real floor | s per 1,000 samples |", "|" + " --- |" * 7]
  for r in rows:
    lo, hi = min(r["class_fractions"]), max(r["class_fractions"])
    lines.append(f"| {r['method']}{' (eta 0)' if r['method'] == 'ddim' else ''} | {r['model_calls']} | "
                 f"{100 * r['confident_fraction']:.1f}% | {100 * lo:.1f}% .. {100 * hi:.1f}% | "
                 f"{r['frechet_distance']:.2f} | {r['frechet_distance'] / r['frechet_floor_real_vs_real']:.2f} | "
                 f"{r['seconds_per_1000']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  """Scores every requested sampler and writes the table."""
  args = parse_args(argv)
  workdir, step = checkpoint.locate(args.workdir)
  config, step = builders.load_run_config(workdir, step)
  evaluate = builders.build_evaluator(config, workdir)
  rows = [measure(config, workdir, step, m, n, args, evaluate) for m, n in args.samplers]
  table = markdown(rows, step, f"{jax.local_devices()[0].device_kind}, {os.cpu_count()} cores")
  report.publish(table, rows, args.json, args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
