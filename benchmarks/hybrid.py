"""Learned variances against fixed ones on the digits: training time, bits/dim, and sample quality on respaced DDPM.

  python benchmarks/hybrid.py --root runs/hybrid_bench --markdown hybrid.md --json hybrid.json

Trains configs/default.py and configs/digits_hybrid.py (train.py; a finished
workdir is not trained again and its time is not reported), computes the bound
on --num_images evaluation images (sample.py --nll: the default model under
fixed_small and fixed_large, the hybrid under its learned variances), and scores
--num_samples samples of DDPM ancestral sampling at each of --steps respaced
steps (benchmarks/sampler_quality.py, Improved DDPM's even spacing) with the
digits judge: the feature Fréchet distance as a ratio to the real-vs-real floor.
Long: two training runs and eight 1,000-sample DDPM runs (minutes each on a
2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"default": "configs/default.py", "hybrid": "configs/digits_hybrid.py"}


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Command-line options."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", required=True, help="folder of the two workdirs and the intermediate results")
  p.add_argument("--num_images", type=int, default=1000, help="images of the bound")
  p.add_argument("--num_samples", type=int, default=1000, help="samples per sampler row")
  p.add_argument("--steps", default="1000,250,100,50", help="comma-separated DDPM step counts")
  p.add_argument("--json", default="")
  p.add_argument("--markdown", default="")
  return p.parse_args(argv)


def run(*cmd: str) -> float:
  """Runs a command of this checkout (its output shown), raising on failure; returns its wall time in seconds."""
  start = time.perf_counter()
  subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
  return time.perf_counter() - start


def main(argv: list[str]) -> int:
  """Trains, bounds and samples both models, then prints the table."""
  args = parse_args(argv)
  os.makedirs(args.root, exist_ok=True)
  rows: dict[str, dict[str, Any]] = {}
  for name, config in RUNS.items():
    workdir = os.path.join(args.root, name)
    done = os.path.exists(os.path.join(workdir, "curves.png"))  # a finished run leaves its curves
    seconds = run("train.py", f"--config={config}", f"--workdir={workdir}")
    row: dict[str, Any] = {"train_s": None if done else seconds}
    for variance in (["fixed_small", "fixed_large"] if name == "default" else ["learned"]):
      out = os.path.join(args.root, f"{name}_{variance}.json")
      run("sample.py", f"--workdir={workdir}", f"--nll={args.num_images}", f"--out={out}",
          *([f"--variance={variance}"] if variance != "learned" else []))
      with open(out, encoding="utf-8") as f:
        row[f"bpd_{variance}"] = json.load(f)
    quality = os.path.join(args.root, f"{name}_ddpm.json")
    run("benchmarks/sampler_quality.py", f"--workdir={workdir}", f"--num_samples={args.num_samples}",
        f"--samplers={','.join(f'ddpm:{n}' for n in args.steps.split(','))}", "--timestep_spacing=linspace",
        f"--json={quality}")
    with open(quality, encoding="utf-8") as f:
      row["ddpm"] = {r["model_calls"]: r["frechet_distance"] / r["frechet_floor_real_vs_real"] for r in json.load(f)}
    rows[name] = row
  steps = [int(n) for n in args.steps.split(",")]
  bpd = lambda r, v: f"{r[v]['bits_per_dim']:.3f} ± {r[v]['standard_error']:.3f}" if v in r else ""
  lines = [f"{args.num_images} images for the bound, {args.num_samples} samples per DDPM row (even spacing).", "",
           "| model | train time (s) | bits/dim fixed_small | fixed_large | learned | "
           + " | ".join(f"Fréchet ratio, DDPM {n}" for n in steps) + " |", "|" + " --- |" * (5 + len(steps))]
  for name, r in rows.items():
    train = "" if r["train_s"] is None else f"{r['train_s']:.0f}"
    lines.append(f"| {name} | {train} | {bpd(r, 'bpd_fixed_small')} | {bpd(r, 'bpd_fixed_large')} | "
                 f"{bpd(r, 'bpd_learned')} | " + " | ".join(f"{r['ddpm'][n]:.2f}" for n in steps) + " |")
  report.publish("\n".join(lines) + "\n", rows, args.json, args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
