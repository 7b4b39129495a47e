"""Where the default config's train step spends its time on this machine: the costliest XLA operations from a
jax.profiler trace, and what the training loop adds to the bare step.

  python benchmarks/profile_step.py --markdown benchmarks/results/profile.md

Run it alone on the machine: every number is a time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ of this checkout
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top

import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)
import configs.default as default_config  # pylint: disable=g-import-not-at-top
from ddpm_jax import builders, loop, parallel  # pylint: disable=g-import-not-at-top
from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top

# Events of XLA's CPU threads that are not operations: the executor and thread-pool bookkeeping.
NOT_OPS = re.compile(r"^(end: |ThreadpoolListener|ThunkExecutor)")


def median_ms(run: Callable[[], Any], count: int, repeats: int) -> float:
  """Median over repeats of the milliseconds per item of run(), which does `count` items and blocks."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append((time.perf_counter() - start) * 1e3 / count)
  return statistics.median(times)


def op_times(trace_dir: str) -> collections.Counter:
  """Nanoseconds per XLA operation name summed over every XLA thread of a jax.profiler trace."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  total: collections.Counter = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if line.name.startswith("tf_XLA"):
        for event in line.events:
          if not NOT_OPS.match(event.name):
            total[event.name] += event.duration_ns
  return total


def kind(op: str) -> str:
  """An operation's kind: its name without the instance number (convolution.12 -> convolution)."""
  return re.sub(r"\.\d+$", "", op)


def main(argv: list[str]) -> int:
  """Profiles the default step and times the loop's parts; prints (and writes) Markdown."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=100, help="steps per timed run")
  p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
  p.add_argument("--top", type=int, default=10)
  p.add_argument("--markdown", default="")
  args = p.parse_args(argv)

  config = default_config.get_config()
  model, schedule, tx = builders.build_model(config), builders.build_schedule(config), builders.build_optimizer(config)
  runner = parallel.make_runner(builders.build_train_step(config, schedule))
  state = runner.put_state(create_train_state(model, tx, jax.random.key(0), (1,) + builders.image_shape(config)))
  batches = builders.build_batches(config, builders.build_source(config))(0)
  key = jax.random.key(1)
  fixed = runner.put_batch(next(batches))
  holder = [state]

  def bare() -> None:  # the same batch every step: the step alone
    s = holder[0]
    for _ in range(args.steps):
      s, _ = runner.step(s, fixed, key)
    holder[0] = jax.block_until_ready(s)

  def looped() -> None:  # fresh batches through the loop's prefetch, as train.py feeds the step
    s, stream = holder[0], loop.prefetch(batches, runner.put_batch)
    for _ in range(args.steps):
      s, _ = runner.step(s, next(stream), key)
    holder[0] = jax.block_until_ready(s)

  bare()  # compile and warm up
  looped()
  rows = {"bare step": median_ms(bare, args.steps, args.repeats),
          "step fed by the loop's batches": median_ms(looped, args.steps, args.repeats),
          "one host batch (NumPy digits path)": median_ms(lambda: [next(batches) for _ in range(args.steps)],
                                                          args.steps, args.repeats),
          "one put_batch": median_ms(lambda: jax.block_until_ready(
              [runner.put_batch(b) for b in [next(batches) for _ in range(args.steps)]]), args.steps, args.repeats)}
  cost = runner.step.lower(holder[0], fixed, key).compile().cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      bare()
    ops = op_times(trace_dir)
  total = sum(ops.values())
  kinds: collections.Counter = collections.Counter()
  for op, ns in ops.items():
    kinds[kind(op)] += ns

  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
              if line.startswith("model name")), "unknown CPU")
  out = [f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__}; the default config (tiny U-Net, 8x8, batch "
         f"{config.batch_size}); {args.steps} steps per run, median of {args.repeats} runs.", "",
         "| what | ms per step |", "| --- | --- |"]
  out += [f"| {name} | {ms:.2f} |" for name, ms in rows.items()]
  out += ["", f"XLA's cost analysis: {flops / 1e9:.2f} GFLOP per step, {flops / rows['bare step'] / 1e6:.1f} GFLOP/s "
          "in the bare step.", "",
          f"The {args.top} costliest operations of {len(ops)} (thread time in XLA's CPU threads during "
          f"{args.steps} bare steps, {total / 1e6 / args.steps:.2f} ms per step in all):", "",
          "| operation | ms per step | share |", "| --- | --- | --- |"]
  out += [f"| `{op}` | {ns / 1e6 / args.steps:.3f} | {ns / total:.1%} |" for op, ns in ops.most_common(args.top)]
  out += ["", "By kind (the instance number dropped):", "", "| kind | operations | ms per step | share |",
          "| --- | --- | --- | --- |"]
  count = collections.Counter(kind(op) for op in ops)
  out += [f"| `{k}` | {count[k]} | {ns / 1e6 / args.steps:.3f} | {ns / total:.1%} |"
          for k, ns in kinds.most_common(args.top)]
  table = "\n".join(out) + "\n"
  report.publish(table, None, markdown_path=args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
