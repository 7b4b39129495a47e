"""Bytes a run's metrics (metrics.jsonl and the TensorBoard event file) send to a gs:// workdir, against the local
Cloud Storage emulator of the tests (gcp-storage-emulator, requirements-dev.txt).

  python benchmarks/bucket_writes.py                          # 1,000 and 10,000 logged rows
  python benchmarks/bucket_writes.py --rows 100000 --seconds_per_row 0.5

A MetricWriter on gs://bucket/run logs `--rows` rows of the training loop's
scalars, one every `--seconds_per_row` seconds of a simulated clock (the
default config logs every 100 steps; 1 s is 10 steps a row at 10 steps/s),
and a 256x256 sample grid every `--image_every` rows, as the sample hook does.
Printed per row count: the request body bytes the emulator received, the
size of what was written, and the bytes the writer before this one would
have sent, which uploaded each object whole at every flush (the sum of the
object's sizes at each flush, computed from the same writes, not measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # ddpm_jax of this checkout; the tests' emulator


class _Clock:
  """A monotonic clock that the benchmark advances."""

  def __init__(self):
    self.now = 0.0

  def monotonic(self) -> float:
    return self.now


def measure(rows: int, seconds_per_row: float, image_every: int, run: str) -> dict[str, int]:
  """Bytes sent (measured), bytes written and bytes a whole-object writer would send (computed) for one run."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  from ddpm_jax import reporting, storage  # pylint: disable=g-import-not-at-top

  clock = _Clock()
  storage.time = types.SimpleNamespace(monotonic=clock.monotonic)  # the appenders' clock: simulated
  sizes: dict[str, int] = {}
  whole = [0]
  write = storage._BucketAppender.write  # pylint: disable=protected-access

  def counted_write(self, data):
    sizes[self._path] = sizes.get(self._path, 0) + len(data)  # pylint: disable=protected-access
    return write(self, data)

  def flush_as_before(self):  # the earlier writer uploaded the whole object at every flush
    whole[0] += sizes.get(self._path, 0)  # pylint: disable=protected-access
    return flush(self)

  flush = storage._BucketAppender.flush  # pylint: disable=protected-access
  storage._BucketAppender.write, storage._BucketAppender.flush = counted_write, flush_as_before  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  before = gcs_emulator.bytes_received()
  writer = reporting.MetricWriter(f"gs://bucket/{run}")
  for row in range(1, rows + 1):
    clock.now += seconds_per_row
    loss = float(rng.uniform(0.01, 0.1))
    writer.write(row * 10, {"loss": loss, "grad_norm": 1.0 + loss, "lr": 2e-4, "steps_per_s": 10.0,
                            "images_per_s": 1280.0})
    if row % image_every == 0:
      writer.write_image(row * 10, "samples", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
  writer.close()
  storage._BucketAppender.write, storage._BucketAppender.flush = write, flush  # pylint: disable=protected-access
  return {"sent": gcs_emulator.bytes_received() - before, "written": sum(sizes.values()), "whole": whole[0]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
  parser.add_argument("--seconds_per_row", type=float, default=1.0)
  parser.add_argument("--image_every", type=int, default=200)
  args = parser.parse_args()
  import gcs_emulator  # pylint: disable=g-import-not-at-top

  port = gcs_emulator.free_port()
  os.environ.update(gcs_emulator.environment(port))
  server = gcs_emulator.start(port)
  try:
    from ddpm_jax import storage  # pylint: disable=g-import-not-at-top

    print(f"one row every {args.seconds_per_row} s, a 256x256 image every {args.image_every} rows, uploads at most "
          f"every {storage.UPLOAD_EVERY_S:.0f} s")
    print("rows | bytes sent | bytes written | sent / written | whole-object writer (computed)")
    for n in args.rows:
      got = measure(n, args.seconds_per_row, args.image_every, f"run{n}")
      print(f"{n} | {got['sent']:,} | {got['written']:,} | {got['sent'] / got['written']:.3f} | {got['whole']:,}",
            flush=True)
  finally:
    server.stop()


if __name__ == "__main__":
  main()
