"""Classifier-free guidance's trade-off on a trained conditional workdir: the guidance table and picture of
docs/results.md.

  python benchmarks/guidance.py --workdir runs/guided --num_samples 1000 --scales 1,2,3,5 --picture docs/guided.png

For each guidance scale w, --num_samples samples are drawn from the
checkpoint's EMA parameters, the classes 0..9 in turn (sample i asks for class
i mod 10; sample i depends only on (--seed, i, its class)), with the config's
sampler, and scored by the digits judge: the fraction the judge gives the
requested class with probability >= 0.9 (overall and for the worst class), the
fraction confident of any class, and the feature Fréchet distance as a ratio to
the real-vs-real floor. The held-out real digits are scored the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from ddpm_jax import builders, checkpoint, images  # pylint: disable=g-import-not-at-top


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a trained conditional run (its latest checkpoint is used)")
  p.add_argument("--num_samples", type=int, default=1000)
  p.add_argument("--scales", default="1,2,3,5", help="comma-separated guidance scales")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--picture", default="", help="write a grid of 10 samples per class (one class per row) at "
                                               "--picture_scale here")
  p.add_argument("--picture_scale", type=float, default=None, help="default: the config's guidance_scale")
  p.add_argument("--json", default="")
  p.add_argument("--markdown", default="")
  args = p.parse_args(argv)
  try:
    args.scales = [float(w) for w in args.scales.split(",")]
  except ValueError:
    p.error(f"--scales={args.scales!r} is invalid: use numbers separated by commas, e.g. 1,2,3,5")
  return args


def main(argv: list[str]) -> int:
  """Scores every guidance scale and writes the table (and the picture)."""
  args = parse_args(argv)
  workdir, step = checkpoint.locate(args.workdir)
  config, step = builders.load_run_config(workdir, step)
  num_classes = config.model.get("num_classes") or 0
  if not num_classes:
    raise SystemExit(f"guidance.py: error: {workdir} holds an unconditional model (model.num_classes=0)")
  evaluate = builders.build_evaluator(config, workdir)
  schedule, model = builders.build_schedule(config), builders.build_model(config)
  params = builders.restore_sampling_params(config, workdir, step)
  key = jax.random.key(args.seed)
  labels = np.arange(args.num_samples, dtype=np.int32) % num_classes
  rows = []
  for w in args.scales:
    options = builders.sampler_options(config, guidance_scale=w)
    generate = builders.build_generator(config, model, schedule, options)
    start = time.perf_counter()
    samples = generate(params, key, args.num_samples, labels=labels)
    seconds = time.perf_counter() - start
    result = evaluate(samples, labels)
    rows.append({"guidance_scale": w, "seconds": seconds, **result})
    print(json.dumps(rows[-1]), flush=True)
  if args.picture:
    w = config.sample.guidance_scale if args.picture_scale is None else args.picture_scale
    generate = builders.build_generator(config, model, schedule, builders.sampler_options(config, guidance_scale=w))
    picture_labels, cols = images.class_rows(range(num_classes), 10 * num_classes)
    images.save_samples(args.picture, generate(params, key, len(picture_labels), labels=picture_labels), cols,
                        labels=picture_labels)
    print(f"wrote {args.picture} (guidance {w:g})", file=sys.stderr)
  real = rows[0]["real_requested_fraction"]
  lines = [f"Checkpoint step {step}; {args.num_samples} samples per row, classes in turn; "
           f"{config.sample.method} with {config.sample.num_steps} steps; "
           f"{jax.local_devices()[0].device_kind}, {os.cpu_count()} cores.", "",
           "| guidance w | requested class, p >= 0.9 | worst class | any class, p >= 0.9 | Fréchet ratio to the "
           "real floor |", "|" + " --- |" * 5]
  for r in rows:
    worst = min((f, k) for k, f in enumerate(r["requested_fraction_by_class"]) if f is not None)
    lines.append(f"| {r['guidance_scale']:g} | {100 * r['requested_fraction']:.1f}% | {worst[1]}: "
                 f"{100 * worst[0]:.1f}% | {100 * r['confident_fraction']:.1f}% | "
                 f"{r['frechet_distance'] / r['frechet_floor_real_vs_real']:.2f} |")
  lines.append(f"| real digits (held out) | {100 * real:.1f}% | | | 1 (by definition) |")
  report.publish("\n".join(lines) + "\n", rows, args.json, args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
