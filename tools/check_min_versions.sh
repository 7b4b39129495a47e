#!/usr/bin/env bash
# The minimum-versions check: a fresh virtual environment with every runtime dependency at the version
# requirements-min.txt pins (the lower bounds of requirements.txt), the package with --no-deps, pytest,
# SciPy and TensorBoard (test dependencies: the tests read tensorboardX's event files back with TensorBoard's
# reader), then train.py and sample.py end to end (a tiny model, 5 steps, its checkpoint sampled) and the test suite's
# fast subset. Not part of CI, which stays on the newest versions.
#
#   bash tools/check_min_versions.sh            # the fast subset (the suite less its two slowest tests)
#   bash tools/check_min_versions.sh tests      # any pytest arguments instead, e.g. the whole suite
#
# PYTHON picks the interpreter (default python3; the minimums are checked on Python 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

# Each >= bound of requirements.txt must be the == pin of requirements-min.txt, and the reverse.
norm() { sed 's/==\([0-9]*\.[0-9]*\)$/==\1.0/' | sort -u; }  # 2.20 == 2.20.0
lower_bounds() { sed -n 's/^\([A-Za-z0-9_.-]*\)>=\([^;, ]*\).*/\1==\2/p' requirements.txt | norm; }
pins() { sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^;, ]*\).*/\1==\2/p' requirements-min.txt | norm; }
if ! diff <(lower_bounds) <(pins) >&2; then
  echo "check_min_versions: requirements.txt's lower bounds and requirements-min.txt's pins differ (above)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
# shellcheck disable=SC1091
source "$tmp/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-min.txt pytest scipy 'tensorboard>=2.20'
python -m pip install -q --no-deps .
python -m pip check
echo "check_min_versions: Python $(python -c 'import platform; print(platform.python_version())'); installed:"
python -m pip list --format=freeze | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|tensorflow.datasets|grain|numpy|ml.collections|absl-py|tensorboardX|matplotlib|pillow|scikit-learn|importlib.resources|protobuf|tensorboard)==' | sed 's/^/  /'

# The entry points end to end, as a user runs them: train a tiny model for 5 steps (its end-of-run grid and curves
# included), then sample its checkpoint.
python train.py --workdir="$tmp/run" --compilation_cache="$tmp/xla" --config.model.base_channels=8 \
  --config.model.channel_mult='(1,2)' --config.batch_size=16 --config.num_train_steps=5 --config.log_every_steps=5 \
  --config.sample.num_samples=4 --config.sample.num_steps=2
python sample.py --workdir="$tmp/run" --compilation_cache="$tmp/xla" --num_samples=4 --steps=2 --out="$tmp/samples.png"
test -s "$tmp/samples.png" && test -s "$tmp/run/curves.png"
echo "check_min_versions: train.py and sample.py ran end to end"

# The package under test is this checkout (pytest's pythonpath is "."); the venv's copy only proves it installs.
# The two deselected tests start 4 simulated devices or 2 processes; every other test runs.
if [ "$#" -eq 0 ]; then
  set -- tests -k "not on_four_devices_match_one_device and not two_processes_of_two_devices"
fi
python -m pytest -q -p no:cacheprovider "$@"
