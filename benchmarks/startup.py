"""Where the time before the first train step goes, with XLA's compilation cache cold and then warm.

  python benchmarks/startup.py --preset ddpm_cifar10 --batch 128 --precision bf16 --device gpu
  python benchmarks/startup.py --preset tiny,ddpm_cifar10 --batch 16 --markdown startup.md

Each (preset, cache state) runs in a fresh process: "cold" with an empty cache folder, "warm" in a second process
with the folder the cold one filled. Phases, in seconds: importing JAX and the library, starting the backend
(jax.devices()), creating the train state (create_train_state in the step's shardings, on the devices), compiling
the train step, and the first step (run and waited for); "total" is the sum, what train.py spends before its first
step besides reading data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ddpm_jax of this checkout
import report  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/report.py)

PRESET_SIZES = {"tiny": 32, "ddpm_cifar10": 32, "book64": 64}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
PHASES = ("import_s", "backend_s", "state_s", "compile_s", "first_step_s")


def measure(preset: str, batch: int, precision: str, cache: str, device: str) -> dict[str, float]:
  """The phases' seconds in this process (JAX must not have been imported yet), with train.py's compilation cache
  setting in folder `cache`; exits with code 2 and one line when `device` is gpu and JAX's backend is not."""
  start = time.perf_counter()
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax import parallel, runtime, training  # pylint: disable=g-import-not-at-top
  from ddpm_jax.schedule import make_schedule  # pylint: disable=g-import-not-at-top
  from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top
  from ddpm_jax.unet import unet_preset  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache(cache)
  out = {}
  lap = lambda: time.perf_counter() - start
  out["import_s"] = lap()
  start = time.perf_counter()
  jax.devices()
  out["backend_s"] = lap()
  if device == "gpu" and jax.default_backend() != "gpu":
    print(f"startup.py: error: --device gpu but JAX's backend is {jax.default_backend()!r}: install jax[cuda12] "
          "(or jax[cuda13])", file=sys.stderr)
    sys.exit(2)

  size = PRESET_SIZES[preset]
  model = unet_preset(preset, dtype=PRECISIONS[precision])
  tx = training.make_optimizer(learning_rate=2e-4, total_steps=800_000, warmup_steps=5000, grad_clip_norm=1.0)
  runner = parallel.make_runner(functools.partial(training.train_step, schedule=make_schedule("linear", 1000),
                                                  ema_decay=0.9999), "jit")
  start = time.perf_counter()
  state = runner.put_state(create_train_state(model, tx, jax.random.key(0), (1, size, size, 3),
                                              runner.state_shardings))
  jax.block_until_ready(state)
  out["state_s"] = lap()
  x = runner.put_batch(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))
  key = jax.random.key(1)
  start = time.perf_counter()
  step = runner.step.lower(state, x, key).compile()
  out["compile_s"] = lap()
  start = time.perf_counter()
  jax.block_until_ready(step(state, x, key))
  out["first_step_s"] = lap()
  return out


def main(argv: list[str]) -> int:
  """Runs every requested (preset, batch, precision) cold then warm, each in a fresh process, and reports."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny", help="comma-separated: " + ", ".join(PRESET_SIZES))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--json", default="")
  p.add_argument("--markdown", default="")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # one measurement with this cache, JSON on stdout
  args = p.parse_args(argv)
  presets = args.preset.split(",")
  bad = [x for x in presets if x not in PRESET_SIZES]
  if bad or args.batch < 1:
    p.error(f"invalid --preset {','.join(bad)} or --batch {args.batch}: presets are {', '.join(PRESET_SIZES)}, "
            "the batch a positive integer")
  if args.child:
    print(json.dumps(measure(presets[0], args.batch, args.precision, args.child, args.device)))
    return 0
  rows: list[dict[str, Any]] = []
  for preset in presets:
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ, **({"JAX_PLATFORMS": "cpu"} if args.device == "cpu" else {}))
      for state in ("cold", "warm"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={cache}", f"--preset={preset}",
                               f"--batch={args.batch}", f"--precision={args.precision}", f"--device={args.device}"],
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode == 2:  # a wrong backend: the child's one line
          print(done.stderr.strip().splitlines()[-1], file=sys.stderr)
          return 2
        if done.returncode:
          print(done.stderr[-3000:], file=sys.stderr)
          print(f"startup.py: error: the {state} run of {preset} failed with exit code {done.returncode}",
                file=sys.stderr)
          return 1
        row = {"preset": preset, "batch": args.batch, "precision": args.precision, "cache": state,
               **json.loads(done.stdout.strip().splitlines()[-1])}
        row["total_s"] = sum(row[k] for k in PHASES)
        print(json.dumps(row), flush=True)
        rows.append(row)
  lines = ["| preset | batch | precision | cache | import s | backend start s | state creation s | step compile s | "
           "first step s | total s |", "|" + " --- |" * 10]
  lines += [f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['cache']} | "
            + " | ".join(f"{r[k]:.2f}" for k in PHASES + ("total_s",)) + " |" for r in rows]
  report.publish("\n".join(lines) + "\n", rows, args.json, args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
