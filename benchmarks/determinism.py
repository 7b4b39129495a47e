"""Whether train steps repeat bit for bit, and what the deterministic switch costs: one measurement per process.

  python benchmarks/determinism.py --preset tiny --batch 64 --steps 20 [--deterministic]

Prints one JSON line: a SHA-256 of the parameters after `steps` train steps from seed 0 on one fixed batch (the same
digest from two processes: the same bits), and the train rate in images per second over those steps after the first.
`--deterministic` calls runtime.make_deterministic (XLA's deterministic GPU ops, float32 matmul precision) first.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ddpm_jax of this checkout

PRESET_SIZES = {"tiny": 32, "ddpm_cifar10": 32, "book64": 64}


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=tuple(PRESET_SIZES), default="tiny")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--deterministic", action="store_true")
  args = p.parse_args(argv)
  from ddpm_jax import runtime  # pylint: disable=g-import-not-at-top

  if args.deterministic:
    runtime.make_deterministic()  # before JAX starts its backends
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax import parallel, training  # pylint: disable=g-import-not-at-top
  from ddpm_jax.schedule import make_schedule  # pylint: disable=g-import-not-at-top
  from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top
  from ddpm_jax.unet import unet_preset  # pylint: disable=g-import-not-at-top

  size = PRESET_SIZES[args.preset]
  model = unet_preset(args.preset)
  tx = training.make_optimizer(learning_rate=2e-4, total_steps=800_000, warmup_steps=0, lr_schedule="constant",
                               optimizer="adamw", grad_clip_norm=1.0)
  runner = parallel.make_runner(functools.partial(training.train_step, schedule=make_schedule("linear", 1000),
                                                  ema_decay=0.9999), "jit")
  state = runner.put_state(create_train_state(model, tx, jax.random.key(0), (1, size, size, 3),
                                              runner.state_shardings))
  x = runner.put_batch(np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32))
  state, _ = runner.step(state, x, jax.random.key(1))  # compiles
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(args.steps - 1):
    state, _ = runner.step(state, x, jax.random.key(2 + i))
  jax.block_until_ready(state)
  rate = args.batch * (args.steps - 1) / (time.perf_counter() - start)
  leaves = jax.tree_util.tree_leaves(runner.get_state(state).params)
  digest = hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in leaves)).hexdigest()
  print(json.dumps({"preset": args.preset, "batch": args.batch, "steps": args.steps,
                    "deterministic": runtime.is_deterministic(), "backend": jax.default_backend(),
                    "params_sha256": digest, "train_images_per_s": round(rate, 1)}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
