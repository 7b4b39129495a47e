#!/bin/bash
# A lent GPU's checks, in two parts that each fit one call of a time-limited device (every step under its own limit;
# each step's output in RESULTS/NAME.log as it comes, a line "== NAME: exit CODE in S s" after it):
#   bash benchmarks/gpu_session.sh table RESULTS   # gpu.sh's table (5 min cold), then start-up cold and warm (3 min)
#   bash benchmarks/gpu_session.sh suite RESULTS   # the tests on the GPU, train.py end to end, determinism
#   bash benchmarks/gpu_session.sh tests RESULTS   # the tests alone on the GPU, beside the attention memory table
# Run from the repository root with JAX's GPU plugin installed.
set -u
part=${1:?table, suite or tests} results=${2:?results folder}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$results/xla_cache"

step() {  # NAME SECONDS command...: runs it under its limit (SIGINT first: pytest then reports what it ran)
  name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s)"
  begin=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@" > "$results/$name.log" 2>&1
  status=$?
  echo "== $name: exit $status in $(( $(date +%s) - begin )) s"
}

case $part in
  table)
    python -c "import jax; print(jax.__version__, jax.devices())" | tee "$results/jax.txt"
    sh benchmarks/gpu.sh "$results"
    step startup 200 python benchmarks/startup.py --preset ddpm_cifar10 --batch 128 --precision bf16 --device gpu \
        --json "$results/startup.json" --markdown "$results/startup.md"
    cat "$results/startup.md"
    ;;
  suite)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
    # The tests that run in this process (on the GPU); the training runs and multi-process ones start CPU processes.
    step pytest 150 python -m pytest -q -n 8 -p no:cacheprovider -m "not slow and not multiprocess and not gcs" \
        --timeout 140 -o addopts="" -rfE --tb=short --junitxml="$results/pytest.xml" &
    python - "$results/folder" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
os.makedirs(sys.argv[1], exist_ok=True)
for i in range(512):
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/{i:04d}.png")
EOF
    step train_digits 140 python train.py --workdir "$results/digits" &
    step train_cifar_folder 140 python train.py --config=configs/cifar10.py --workdir "$results/cifar" \
        --config.dataset="folder:$results/folder" --config.num_train_steps=20 --config.log_every_steps=10 \
        --config.sample.num_samples=16 --config.sample.batch_size=16 &
    wait
    for i in 1 2; do  # the second pass finds its programs in the compilation cache
      for d in "" --deterministic; do
        step "determinism$i${d:+_on}" 100 python benchmarks/determinism.py --preset ddpm_cifar10 --batch 128 \
            --steps 20 $d
        tail -1 "$results/determinism$i${d:+_on}.log"
      done
    done
    tail -n 5 "$results/pytest.log" "$results/train_digits.log" "$results/train_cifar_folder.log"
    ;;
  tests)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the tests and the memory analysis share the GPU
    step pytest 240 python -m pytest -q -n 6 -p no:cacheprovider -m "not slow and not multiprocess and not gcs" \
        --timeout 200 -o addopts="" -rfE --tb=short --junitxml="$results/pytest.xml" &
    for preset in book64 ddpm_cifar10; do
      step "attention_$preset" 230 python benchmarks/attention_memory.py --preset $preset --batch 64 \
          --json "$results/attention_$preset.json" --markdown "$results/attention_$preset.md" &
    done
    wait
    cat "$results"/attention_*.md
    tail -n 40 "$results/pytest.log"
    ;;
  *) echo "gpu_session.sh: unknown part '$part': use table, suite or tests" >&2; exit 2 ;;
esac
