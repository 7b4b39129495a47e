"""What several test modules share: the repository's root, the small model, one runner for the entry points and
other Python processes, two processes of one run, what a run record's row must say, and the one-line error that ends a
failed start."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional

import flax
import jax
import jaxlib
import ml_collections
import numpy as np
import optax
import orbax.checkpoint
import pytest

import configs.default as default_config
from ddpm_jax import builders, checkpoint, data
from ddpm_jax.train_state import TrainState, create_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"  # its sitecustomize.py injects the fault TEST_FAULT names

# The smallest model worth training: the tiny preset with widths 8 and 16, for the 8x8 digits.
SMALL_MODEL = {"base_channels": 8, "channel_mult": (1, 2)}
SMALL_MODEL_FLAGS = [f"--config.model.{key}={value}".replace(" ", "") for key, value in SMALL_MODEL.items()]
# train.py's runs of the small model, batch 16. They end by --stop_at_step, so that they share num_train_steps (a
# constant of the compiled step) and with it the compilation cache.
SMALL_TRAIN_FLAGS = [*SMALL_MODEL_FLAGS, "--config.batch_size=16", "--config.optim.warmup_steps=2",
                     "--config.log_every_steps=5", "--config.num_train_steps=100000",
                     "--config.checkpoint_every_steps=100000"]


def small_config(**changes: Any) -> ml_collections.ConfigDict:
  """The default config with the small model and batch 16; `changes` maps dotted keys ("optim.eps") to values."""
  config = default_config.get_config()
  for key, value in SMALL_MODEL.items():
    config.model[key] = value
  config.batch_size, config.optim.warmup_steps, config.num_train_steps = 16, 0, 100000
  for key, value in changes.items():
    *path, last = key.split(".")
    target = config
    for part in path:
      target = target[part]
    target[last] = value
  return config


def new_state(config: ml_collections.ConfigDict) -> TrainState:
  """The freshly initialised train state (seed 0) of config's model and optimizer."""
  return create_train_state(builders.build_model(config), builders.build_optimizer(config), jax.random.key(0),
                            (1,) + builders.image_shape(config))


def save_checkpoints(config: ml_collections.ConfigDict, workdir, steps=(0,)) -> None:
  """Checkpoints of config's fresh state, labelled with each of `steps`, in workdir/checkpoints."""
  state = new_state(config)
  manager = checkpoint.make_manager(str(workdir))
  for step in steps:
    checkpoint.save(manager, state.replace(step=jax.numpy.asarray(step)), config.to_dict())
  manager.close()


def small_run(workdir, steps=(2, 4)):
  """A workdir with checkpoints of the small model at `steps`; returns (workdir, config, create_state)."""
  config = small_config()
  save_checkpoints(config, workdir, steps)
  return workdir, config, lambda: new_state(config)


def python_path(*folders) -> str:
  """PYTHONPATH with `folders` (default: the repository) ahead of what this process was given (a machine that
  installs packages there, as the GPU image's `pip --target` does, keeps them)."""
  given = os.environ.get("PYTHONPATH")
  return os.pathsep.join([*(str(f) for f in folders or (ROOT,)), *([given] if given else [])])


# The processes the tests start on the CPU through environment() (train.py, sample.py, scripts) compile at XLA's
# backend optimisation level 0: their compiles take about half the CPU time, and they check behaviour, not the last
# bits of a number (those are checked in the pytest process against independent references, within tolerances, or
# at XLA's default settings under the `optimized` marker). Level 0 gives other bits (no fused multiply-adds), and the
# same bits every run.
CHILD_OPTIMIZATION = "--xla_backend_optimization_level=0"


def xla_flags(devices: Optional[int] = None) -> str:
  """XLA_FLAGS of a child CPU process: this process's XLA_FLAGS with `devices` CPU devices (None: as they say) and,
  unless they name a level, CHILD_OPTIMIZATION."""
  count, level = "--xla_force_host_platform_device_count", CHILD_OPTIMIZATION.split("=")[0]
  given = os.environ.get("XLA_FLAGS", "").split()
  if devices:
    given = [f for f in given if not f.startswith(count + "=")] + [f"{count}={devices}"]
  return " ".join(given + ([] if any(f.startswith(level + "=") for f in given) else [CHILD_OPTIMIZATION]))


def environment(devices: Optional[int] = None, platform: Optional[str] = "cpu", env_extra=None) -> dict[str, str]:
  """This process's environment with the repository importable, JAX_PLATFORMS=platform (None: left unset, as a
  user's shell has it), on the CPU `devices` devices (None: as set) and CHILD_OPTIMIZATION, and env_extra on top."""
  # PYTHONFAULTHANDLER: a process killed by a fatal signal (SIGABRT, SIGSEGV) prints every thread's traceback
  env = dict(os.environ, PYTHONPATH=python_path(), PYTHONFAULTHANDLER="1")
  env.pop("JAX_PLATFORMS", None)
  if platform:
    env["JAX_PLATFORMS"] = platform
  if platform == "cpu":
    env["XLA_FLAGS"] = xla_flags(devices)
  env.update(env_extra or {})
  return env


def run_python(*args, devices=None, platform="cpu", env_extra=None, timeout=300, background=False, cwd=None,
               new_session=False):
  """`python *args` in the environment() these name: the finished process (text output captured), or with
  `background` the running one (with `new_session`, in a process group of its own, as a terminal's job is)."""
  cmd = [sys.executable, *map(str, args)]
  env = environment(devices, platform, env_extra)
  if background:
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)
  return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_script(script: str, *args, python_flags=(), **kwargs):
  """A script of the repository (train.py, sample.py, benchmarks/bench.py) with args, as run_python runs it."""
  return run_python(*python_flags, ROOT / script, *args, **kwargs)


def run_train(workdir, *flags, devices=1, config=None, **kwargs):
  """train.py on the small model (SMALL_TRAIN_FLAGS) in workdir, on `devices` CPU devices; `config` is a config file,
  given before the overrides."""
  first = [f"--config={config}"] if config else []
  return run_script("train.py", f"--workdir={workdir}", *first, *SMALL_TRAIN_FLAGS, *flags, devices=devices,
                    **kwargs)


def run_sample(*flags, **kwargs):
  """sample.py with flags, as run_python runs it."""
  return run_script("sample.py", *flags, **kwargs)


def fault_env(spec: str) -> dict[str, str]:
  """The environment that makes train.py's process inject the fault `spec` (tests/faults/sitecustomize.py)."""
  return {"TEST_FAULT": spec, "PYTHONPATH": python_path(FAULTS, ROOT)}


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


SLURM_PORTS = 61440  # JAX's SLURM detector puts the coordinator on port SLURM_JOB_ID % 4096 + 61440


def free_slurm_job_id() -> int:
  """A SLURM job id whose coordinator port (JAX's rule) is free on 127.0.0.1."""
  for job_id in random.Random().sample(range(4096), 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", SLURM_PORTS + job_id))
      except OSError:
        continue
      return job_id
  pytest.skip(f"no free port in {SLURM_PORTS}..65535")


def start_two_processes(workdir, *flags, slurm=False, env_extra=None, env_of=({}, {})):
  """train.py as 2 processes x 2 devices on 127.0.0.1, in the background: told so by flags, or (slurm) by nothing
  but the environment srun gives the tasks of a job of two one-task nodes. env_of[i]: process i's own variables."""
  if slurm:
    job = {"SLURM_JOB_ID": str(free_slurm_job_id()), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
           "SLURM_LOCALID": "0"}
    return [run_train(workdir, *flags, devices=2, background=True,
                      env_extra={**job, "SLURM_PROCID": str(i), **(env_extra or {}), **env_of[i]}) for i in range(2)]
  port = free_port()
  return [run_train(workdir, *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}", devices=2, background=True, env_extra={**(env_extra or {}), **env_of[i]})
          for i in range(2)]


# The model flags of the 2-process tests (test_training's chain test, test_multiprocess, test_gcs), whose compiled
# programs the compilation cache shares.
MODEL = ("--config.ema.decay=0.5", "--config.optim.eps=1.0")
RUN_TWO_S = 480  # the longest a 2-process run may take (a loaded 2-core machine: a minute's start and compile each)


def run_two(workdir, *flags, fault=None, env_extra=None, env_of=({}, {})):
  """train.py as 2 processes x 2 devices until both end: [(exit code, stderr, seconds from start to its end)]."""
  start = time.time()
  procs = start_two_processes(workdir, *flags, env_extra={**(fault_env(fault) if fault else {}), **(env_extra or {})},
                              env_of=env_of)
  ended = [None, None]
  deadline = start + RUN_TWO_S
  while None in ended and time.time() < deadline:
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time() - start
    time.sleep(0.05)
  for p in procs:
    p.kill()
  errs = [p.communicate()[1] for p in procs]
  assert None not in ended, f"a process did not end within {RUN_TWO_S} s: {errs[0][-1500:]} | {errs[1][-1500:]}"
  return [(p.returncode, err, seconds) for p, err, seconds in zip(procs, errs, ended)]


def git(*args, cwd=ROOT) -> str:
  """The output of `git ARGS` in cwd."""
  return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def assert_row_describes_this_machine(row, *, command_has, resumed_from, parallelism="single", devices=1):
  """A row of a train.py run started by the tests on this CPU (JAX_PLATFORMS=cpu, `devices` CPU devices, one
  process, the digits) holds the truth about it, each field checked against its own source."""
  try:  # a checkout (None when the tests run from an unpacked copy)
    code = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
  except (OSError, subprocess.CalledProcessError):
    code = None
  assert row["code"] == code
  assert row["python"] == ".".join(map(str, sys.version_info[:3]))
  packages = row["packages"]
  assert (packages["jax"], packages["jaxlib"], packages["flax"], packages["optax"], packages["numpy"]) == (
      jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__, np.__version__)
  assert packages["orbax-checkpoint"] == orbax.checkpoint.__version__
  assert packages["grain"] == importlib.metadata.version("grain")
  assert packages["tensorflow-datasets"] == importlib.metadata.version("tensorflow-datasets")
  assert (row["backend"], row["device_kind"], row["device_count"], row["process_count"]) == (
      "cpu", jax.devices("cpu")[0].device_kind, devices, 1)
  assert row["parallelism"] == parallelism and row["deterministic"] is False
  assert row["xla_flags"] == xla_flags(devices)
  assert row["jax_settings"]["jax_platforms"] == "cpu" and row["jax_settings"]["environment"]["JAX_PLATFORMS"] == "cpu"
  assert row["jax_settings"]["jax_default_matmul_precision"] is None and row["jax_settings"]["jax_enable_x64"] is False
  assert os.path.basename(row["command"][0]) == "train.py" and command_has in row["command"]
  with open(data._digits_table(), "rb") as f:  # pylint: disable=protected-access
    assert row["dataset"] == {"name": "digits", "sha256": hashlib.sha256(f.read()).hexdigest()}
  assert row["resumed_from"] == resumed_from and row["config"]["batch_size"] == 16


LOG_LINE = re.compile(r"^[IWE]\d{4} ")  # absl's log lines


def stop(proc, signum=signal.SIGINT):
  """Sends signum; returns (seconds until the process ended, its stderr lines that are not absl log lines)."""
  start = time.time()
  proc.send_signal(signum)
  try:
    _, err = proc.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert "Traceback" not in err, err[-3000:]
  return time.time() - start, [line for line in err.splitlines() if not LOG_LINE.match(line)]



def last_line(stderr: str) -> str:
  """The last line of a process's stderr, after checking that no traceback precedes it."""
  assert "Traceback" not in stderr, stderr[-3000:]
  return stderr.strip().splitlines()[-1]


def one_error_line(res: subprocess.CompletedProcess, program: str) -> str:
  """MESSAGE of the `program: error: MESSAGE` line that ends res's stderr, after checking that nothing but log lines
  precede it (no traceback, no asyncio report)."""
  assert "Event loop is closed" not in res.stderr, res.stderr[-3000:]
  last = last_line(res.stderr)
  assert last.startswith(f"{program}: error: "), last
  return last[len(f"{program}: error: "):]
