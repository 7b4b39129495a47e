"""How long a checkpoint save blocks the training loop's thread: blocking (save and wait) against async saves.

  python benchmarks/save_stall.py                  # configs/flowers64.py: the book64 model, about 1.6 GB
  python benchmarks/save_stall.py --saves 5 --dir /mnt/fast/tmp

The train state of configs/flowers64.py (the book64 model: params, EMA params, Adam moments; random
values, as a trained state's, which compress no better) is saved `--saves`
times each way in one process. "blocking" is a save followed by waiting for
its write, as every save was before writes went to the background; "async" is
checkpoint.save alone (the stall the loop sees), and "written" the time from
the start of an async save until its write finished. Each async save's write
is waited for before the next starts, as in a run whose saves are further
apart than one write. Prints the CPU model and the medians, in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ddpm_jax of this checkout
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import configs.flowers64 as book64_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import builders, checkpoint, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax.train_state import TrainState, create_train_state  # pylint: disable=g-import-not-at-top,wrong-import-position

def cpu_model() -> str:
  """lscpu's "Model name" of this machine."""
  lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
  return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def random_state(config: Any) -> TrainState:
  """The config's train state on the device, its floats random normal (its shapes from jax.eval_shape: no model
  is run)."""
  model, tx = builders.build_model(config), builders.build_optimizer(config)
  shape = (1,) + builders.image_shape(config)
  abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0), shape))
  rng = np.random.default_rng(0)
  fill = lambda x: (rng.standard_normal(x.shape, np.float32).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
                    else np.zeros(x.shape, x.dtype))
  return jax.device_put(jax.tree_util.tree_map(fill, abstract))


def timed(fn: Callable[[], Any]) -> float:
  """Seconds fn() takes."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure(state: TrainState, config: dict, directory: str, saves: int) -> dict[str, list[float]]:
  """Seconds per save: blocking (save + wait), async (the save call alone) and written (async save until its
  write finished)."""
  manager = checkpoint.make_manager(directory, keep=2)
  at = lambda step: state.replace(step=jax.numpy.asarray(step))
  out: dict[str, list[float]] = {"blocking": [], "async": [], "written": []}
  try:
    for i in range(saves):
      out["blocking"].append(timed(lambda: (checkpoint.save(manager, at(i + 1), config),
                                            manager.wait_until_finished())))
    for i in range(saves):
      start = time.perf_counter()
      out["async"].append(timed(lambda: checkpoint.save(manager, at(saves + i + 1), config)))
      manager.wait_until_finished()
      out["written"].append(time.perf_counter() - start)
  finally:
    checkpoint.close(manager)
  return out


def main() -> None:
  """Parses the flags, measures, prints."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--saves", type=int, default=3, help="saves each way (medians over them)")
  parser.add_argument("--dir", default=None, help="where to write (a temporary folder, removed afterwards)")
  args = parser.parse_args()
  runtime.quiet_orbax()
  config = book64_config.get_config()
  state = random_state(config)
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
    seconds = measure(state, config.to_dict(), workdir, args.saves)
  median = {k: statistics.median(v) for k, v in seconds.items()}
  print(f"cpu: {cpu_model()}; {jax.device_count()} {jax.devices()[0].platform} device(s); state {nbytes / 1e9:.2f} GB"
        f"; {args.saves} saves each way")
  for k, v in seconds.items():
    print(f"{k:>8}: median {median[k]:.2f} s  (each: {', '.join(f'{s:.2f}' for s in v)})")
  print(f"stall per save: {median['blocking']:.2f} s blocking -> {median['async']:.2f} s async "
        f"({median['blocking'] / median['async']:.1f}x less); the async write finished {median['written']:.2f} s "
        "after the save began")


if __name__ == "__main__":
  main()
