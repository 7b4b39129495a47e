#!/bin/sh
# The GPU table on one GPU within 5 minutes, cold compiles included: run from the repository root as
#   sh benchmarks/gpu.sh [OUT]
# Each configuration runs in its own process under its own time limit (30 + 150 + 120 s: a cold JAX compile for the
# big presets, both PyTorch peers with torch.compile's own, and the timed runs; ddpm_cifar10's row also times
# DDPM-1000 sampling, whose rate gives the time of FID-50k's samples). Every number is printed as a "[bench] ..."
# line the moment it is measured and kept in OUT/gpu_NAME.log, and written to OUT/gpu_NAME.json as it is measured
# ("complete": false until the row ends), so a row cut off by its limit keeps what it measured; the .md table is
# written when the row ends. Timed runs last at least 1 s each (5 of them, the median reported with its spread,
# (max - min) / median). Every row compiles into one on-disk XLA compilation cache, OUT/xla_cache, so a rerun skips
# the JAX compiles. The PyTorch peers (eager and torch.compile) run when PyTorch is installed.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$out/xla_cache}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu_device.txt"

run() {  # NAME SECONDS bench.py-options...
  name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s)"
  timeout -k 5 "$limit" python benchmarks/bench.py --device gpu --repeats 5 --steps 10 --min_run_s 1 \
      --sample_repeats 2 --torch_compile "$@" --json "$out/gpu_$name.json" --markdown "$out/gpu_$name.md" \
      > "$out/gpu_$name.log" 2>&1
  status=$?
  grep -E '^\[bench\]|^matmul' "$out/gpu_$name.log"
  [ "$status" -eq 0 ] || echo "== $name: exit $status (124: over its $limit s); the log is $out/gpu_$name.log"
}

run tiny 30 --preset tiny --batch 64 --precision fp32
run ddpm_cifar10 150 --preset ddpm_cifar10 --batch 128 --precision bf16 --ddpm1000 on
run book64 120 --preset book64 --batch 64 --precision bf16 --ddpm1000 off
cat "$out"/gpu_*.md 2>/dev/null
