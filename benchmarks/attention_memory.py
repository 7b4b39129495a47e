"""Peak temporary memory of the single-device train step with attention as XLA's dot products or as cuDNN's fused
kernel.

  python benchmarks/attention_memory.py --preset book64,ddpm_cifar10 --batch 64 --precision bf16,fp32

Each configuration is compiled once per attention implementation (nothing runs) and XLA's compiled memory analysis
is read, with the U-Net's `attention` field set to each kernel: `xla` materialises the B x heads x L x L scores,
`cudnn` is cuDNN's fused kernel (on a GPU in bf16 or fp16 only: elsewhere its rows are skipped with a line saying
so). A row is written to --json the moment it is measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)
from bench import PRECISIONS, PRESET_SIZES  # pylint: disable=g-import-not-at-top  (bench.py loads JAX lazily)
from ddpm_jax import training  # pylint: disable=g-import-not-at-top
from ddpm_jax.schedule import make_schedule  # pylint: disable=g-import-not-at-top
from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top
from ddpm_jax.unet import ATTENTIONS, cudnn_attention_runs, unet_preset  # pylint: disable=g-import-not-at-top

IMPLEMENTATIONS = tuple(a for a in ATTENTIONS if a != "auto")  # the kernels themselves


def step_memory(preset: str, batch: int, precision: str, implementation: str) -> dict[str, Any]:
  """XLA's memory analysis of one compiled train step with attention forced to `implementation`."""
  size = PRESET_SIZES[preset]
  model = unet_preset(preset, dtype=PRECISIONS[precision], attention=implementation)
  tx = training.make_optimizer(learning_rate=2e-4, total_steps=800_000, warmup_steps=5000, lr_schedule="constant",
                               optimizer="adamw", grad_clip_norm=1.0)
  step = functools.partial(training.train_step, schedule=make_schedule("linear", 1000), ema_decay=0.9999)
  state = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0), (1, size, size, 3)))
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  row = {"preset": preset, "batch": batch, "precision": precision, "attention": implementation,
         "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
  start = time.perf_counter()
  try:
    m = jax.jit(step, donate_argnums=0).lower(state, x, key).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  # cuDNN refuses some shapes and dtypes: say why
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row
  row.update(compile_s=round(time.perf_counter() - start, 1), temp_bytes=m.temp_size_in_bytes,
             argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes)
  return row


def markdown(rows: list[dict[str, Any]]) -> str:
  """The rows as a table: temporaries of each implementation, and cudnn's against xla's."""
  gib = lambda b: f"{b / 2**30:,.2f}"
  lines = ["| preset | batch | precision | device | attention | temporaries GiB | arguments GiB | vs xla |",
           "|" + " --- |" * 8]
  for r in rows:
    base = next((q for q in rows if q["attention"] == "xla" and "temp_bytes" in q and
                 (q["preset"], q["batch"], q["precision"]) == (r["preset"], r["batch"], r["precision"])), None)
    if "error" in r:
      lines.append(f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['device']} | {r['attention']} | "
                   f"not applicable: {r['error'][:80]} | | |")
      continue
    ratio = f"{r['temp_bytes'] / base['temp_bytes']:.2f}" if base else ""
    lines.append(f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['device']} | {r['attention']} | "
                 f"{gib(r['temp_bytes'])} | {gib(r['argument_bytes'])} | {ratio} |")
  return "\n".join(lines) + "\n"


def main() -> None:
  """Measures every (preset, precision, implementation) and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="book64,ddpm_cifar10", help=f"comma-separated: {', '.join(PRESET_SIZES)}")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--precision", default="bf16,fp32", help="comma-separated: fp32, bf16")
  parser.add_argument("--attention", default=",".join(IMPLEMENTATIONS), help="comma-separated: xla, cudnn")
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  args = parser.parse_args()
  presets, precisions, impls = args.preset.split(","), args.precision.split(","), args.attention.split(",")
  bad = ([p for p in presets if p not in PRESET_SIZES] + [p for p in precisions if p not in PRECISIONS] +
         [i for i in impls if i not in IMPLEMENTATIONS])
  if bad or args.batch < 1:
    parser.error(f"invalid {', '.join(bad) or f'--batch {args.batch}'}: presets {', '.join(PRESET_SIZES)}; precisions "
                 f"{', '.join(PRECISIONS)}; attention {', '.join(IMPLEMENTATIONS)}; batch a positive integer")
  rows = []
  for preset in presets:
    for precision in precisions:
      for impl in impls:
        if impl == "cudnn" and not cudnn_attention_runs(PRECISIONS[precision]):
          print(f"[attention_memory] {preset} {precision} cudnn: skipped, cuDNN's fused attention needs a GPU and "
                f"bf16 or fp16 (this machine: {jax.default_backend()})", flush=True)
          continue
        rows.append(step_memory(preset, args.batch, precision, impl))
        print(f"[attention_memory] {rows[-1]}", flush=True)
        if args.json:
          report.write_json(rows, args.json)
  report.publish(markdown(rows), rows, args.json, args.markdown)


if __name__ == "__main__":
  main()
