#!/bin/sh
# The GPU table in one short script (bf16; each configuration in a fresh process): run from the repository root.
set -e
out=${1:-benchmarks/results}
mkdir -p "$out"
python benchmarks/bench.py --device gpu --preset ddpm_cifar10 --batch 128 --sample_repeats 2 \
    --json "$out/gpu_ddpm_cifar10.json" --markdown "$out/gpu_ddpm_cifar10.md"
python benchmarks/bench.py --device gpu --preset book64 --batch 32 --sample_repeats 2 \
    --json "$out/gpu_book64.json" --markdown "$out/gpu_book64.md"
