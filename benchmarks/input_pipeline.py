"""Input-pipeline throughput: images/s of `data.batch_stream` per source and worker count, and a big folder's start.

  python benchmarks/input_pipeline.py --num_images 2000 --image_size 64 --batch 128 --steps 60 --workers 0,1,2 \
      --start_files 100000

Sources: a folder of JPEGs it writes (decoded in 0, 1, 2... Grain worker processes), CIFAR-sized 32x32x3 images held
in memory (gathered per batch with flips, in the training process's reading threads), and the digits. Each stream is
read for `--steps` batches after `--warmup` batches (worker start-up and the first decode excluded); the median of
`--repeats` timed runs is reported, with images/s per worker process where workers decode. With `--start_files N`, N
small PNGs are written and the time from `make_source` to the first batch is measured (cold: a fresh listing). Only
`make_source`, `array_source` and `batch_stream` are used."""

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


def write_pngs(root: str, count: int, size: int) -> None:
  """`count` random size x size RGB PNGs under root, 1,000 per subfolder (as a big dataset is laid out)."""
  rng = np.random.default_rng(0)
  for k in range(count):
    folder = os.path.join(root, f"{k // 1000:04d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{k:07d}.png"))


def start_seconds(root: str, batch: int, size: int) -> tuple[float, float]:
  """(seconds to list the folder, seconds from then to the first batch decoded in this process)."""
  start = time.perf_counter()
  source = data.make_source(f"folder:{root}")
  listed = time.perf_counter()
  stream = data.batch_stream(source, seed=0, global_batch=batch, image_size=size, worker_count=0)
  next(stream)
  first = time.perf_counter() - listed
  stream.close()  # its reading threads stop before the folder goes
  return listed - start, first


def main() -> None:
  """Times each source and worker count, and a big folder's start, and prints a table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", default="0,2", help="comma-separated worker counts for the folder stream")
  parser.add_argument("--start_files", type=int, default=0, help="also time the start on a folder of this many PNGs")
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  rng = np.random.default_rng(0)
  in_memory = data.array_source(rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8))
  rows = []
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.num_images, args.image_size)
    folder = data.make_source(f"folder:{root}")
    cases = [(f"folder: {args.num_images} JPEGs {args.image_size}x{args.image_size} RGB, flips", folder,
              args.image_size, 3, w) for w in workers]
    cases += [("in memory: 50,000 32x32 RGB, flips", in_memory, 32, 3, 0),
              ("digits 8x8 gray (the default run's stream)", data.make_source("digits"), 8, 1, 0)]
    for name, source, size, channels, count in cases:
      batch = args.batch if channels == 3 else 64
      rates = [images_per_s(source, batch, size, channels, args.steps, args.warmup, worker_count=count)
               for _ in range(args.repeats)]
      median = statistics.median(rates)
      rows.append({"source": name, "workers": count, "batch": batch, "images_per_s": median,
                   "per_worker": median / count if count else None, "spread": (max(rates) - min(rates)) / median})
      print(f"{name}, {count} workers: {', '.join(f'{r:,.0f}' for r in rates)} img/s", file=sys.stderr, flush=True)
  table = ("| source | decoding workers | batch | images/s (median) | per worker | spread (max-min)/median |\n"
           "|---|---|---|---|---|---|\n" + "".join(
               f"| {r['source']} | {r['workers']} | {r['batch']} | {r['images_per_s']:,.0f} | "
               f"{format(r['per_worker'], ',.0f') if r['per_worker'] else ''} | {r['spread']:.1%} |\n" for r in rows))
  if args.start_files:
    with tempfile.TemporaryDirectory() as root:
      write_pngs(root, args.start_files, 32)
      listed, first = start_seconds(root, args.batch, 32)
    rows.append({"source": f"folder start: {args.start_files:,} PNGs 32x32", "list_s": listed, "first_batch_s": first})
    table += (f"\nFolder start, {args.start_files:,} PNGs of 32x32 in {args.start_files // 1000 or 1} subfolders: "
              f"listed in {listed:.2f} s, first batch of {args.batch} decoded {first:.2f} s later.\n")
  report.publish(table, rows, args.json, args.markdown)


if __name__ == "__main__":
  main()
