#!/bin/sh
# The GPU table in one short script (bf16; each configuration in a fresh process): run from the repository root.
# One GPU runs plain jit; several run the train step under pmap and under jit (a mesh over every GPU).
set -e
out=${1:-benchmarks/results}
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
modes=jit
[ "$gpus" -gt 1 ] && modes="pmap jit"
for mode in $modes; do
  python benchmarks/bench.py --device gpu --parallelism "$mode" --preset ddpm_cifar10 --batch 128 --sample_repeats 2 \
      --json "$out/gpu_ddpm_cifar10_$mode.json" --markdown "$out/gpu_ddpm_cifar10_$mode.md"
  python benchmarks/bench.py --device gpu --parallelism "$mode" --preset book64 --batch 32,64 --sample_repeats 2 \
      --json "$out/gpu_book64_$mode.json" --markdown "$out/gpu_book64_$mode.md"
done
