"""Input-pipeline throughput: images/s of `data.batch_stream` over a folder of JPEGs it writes, and over the digits.

  python benchmarks/input_pipeline.py --num_images 2000 --image_size 64 --batch 128 --steps 60

Each source is read for `--steps` batches after `--warmup` batches (worker start-up and the first decode excluded);
the median of `--repeats` timed runs is reported. Only `make_source` and `batch_stream` are used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)
from ddpm_jax import data  # pylint: disable=g-import-not-at-top


def write_jpegs(root: str, count: int, size: int) -> None:
  """`count` random-noise-on-gradient RGB JPEGs of size x size under root (quality 90)."""
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 200, size, dtype=np.float32)[None, :, None]
  for k in range(count):
    img = np.clip(ramp + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, f"{k:06d}.jpg"), quality=90)


def images_per_s(source, batch: int, image_size: int, channels: int, steps: int, warmup: int, **kw) -> float:
  """Images/s of one stream over `steps` batches after `warmup` batches."""
  stream = data.batch_stream(source, seed=0, global_batch=batch, image_size=image_size, channels=channels, **kw)
  for _ in range(warmup):
    next(stream)
  start = time.perf_counter()
  for _ in range(steps):
    next(stream)
  rate = steps * batch / (time.perf_counter() - start)
  del stream
  return rate


def main() -> None:
  """Times the folder and digits streams and prints a table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.num_images, args.image_size)
    cases = [(f"folder: {args.num_images} JPEGs {args.image_size}x{args.image_size} RGB, flips",
              data.make_source(f"folder:{root}"), args.image_size, 3),
             ("digits 8x8 gray (the default run's stream)", data.make_source("digits"), 8, 1)]
    for name, source, size, channels in cases:
      batch = args.batch if channels == 3 else 64
      rates = [images_per_s(source, batch, size, channels, args.steps, args.warmup) for _ in range(args.repeats)]
      rows.append({"source": name, "batch": batch, "images_per_s": statistics.median(rates),
                   "spread": (max(rates) - min(rates)) / statistics.median(rates)})
      print(f"{name}: {', '.join(f'{r:,.0f}' for r in rates)} img/s", file=sys.stderr, flush=True)
  table = "| source | batch | images/s (median) | spread (max-min)/median |\n|---|---|---|---|\n" + "".join(
      f"| {r['source']} | {r['batch']} | {r['images_per_s']:,.0f} | {r['spread']:.1%} |\n" for r in rows)
  report.publish(table, rows, args.json, args.markdown)


if __name__ == "__main__":
  main()
