#!/bin/sh
# The GPU table on one GPU within 5 minutes, compile included: run from the repository root as
#   sh benchmarks/gpu.sh [OUT]
# Each configuration runs in its own process under its own time limit (60 + 120 + 120 s); every number is printed
# as a "[bench] ..." line the moment it is measured and kept in OUT/gpu_NAME.log, and each configuration's row is
# written to OUT/gpu_NAME.json and .md as soon as it ends. Timed runs last at least 1 s each (5 of them, the median
# reported with its spread, (max - min) / median). XLA's compilation cache is kept in OUT/xla_cache, so a rerun
# skips the JAX compiles. The PyTorch peers (eager and torch.compile) run when PyTorch is installed.
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

run tiny 60 --preset tiny --batch 64 --precision fp32
run ddpm_cifar10 120 --preset ddpm_cifar10 --batch 128 --precision bf16 --ddpm1000 off
run book64 120 --preset book64 --batch 64 --precision bf16 --ddpm1000 off
cat "$out"/gpu_*.md 2>/dev/null
