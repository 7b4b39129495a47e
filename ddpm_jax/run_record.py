"""The run record: WORKDIR/runs.jsonl, one row per start of training saying how the run was made (code version,
library versions, devices, parallelism, XLA and JAX settings, command line, dataset, config, the step resumed from)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import uuid
from typing import Any, Optional, Sequence

import jax

from ddpm_jax import runtime, storage

RUNS = "runs.jsonl"
# The distributions whose versions decide what a run computes; jaxlib's PJRT plugins are found by PLUGIN.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain", "tensorflow-datasets")
PLUGIN = re.compile(r"^(jax[-_](cuda|rocm)\d*[-_](plugin|pjrt)|libtpu.*|jax[-_]metal)$", re.IGNORECASE)
# JAX settings that change what a program computes or where it is cached (recorded whatever their value).
JAX_SETTINGS = ("jax_default_matmul_precision", "jax_enable_x64", "jax_default_prng_impl", "jax_threefry_partitionable",
                "jax_numpy_dtype_promotion", "jax_softmax_custom_jvp", "jax_use_shardy_partitioner", "jax_platforms",
                "jax_optimization_level", "jax_debug_nans", "jax_disable_jit", "jax_compilation_cache_dir")
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout holding ddpm_jax


def code_version(root: str = SOURCE_ROOT) -> Optional[dict[str, Any]]:
  """{"commit": HEAD's hash, "dirty": whether tracked or untracked files differ from it} of the git checkout at root,
  or None when root is not one (an installed package, no git)."""
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True, timeout=30).stdout
  try:
    commit = git("rev-parse", "HEAD").strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=normal").strip())
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, Optional[str]]:
  """Installed version of each of PACKAGES (None: not installed) and of every JAX PJRT plugin (CUDA, ROCm, TPU)."""
  def version(name: str) -> Optional[str]:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None
  versions = {name: version(name) for name in PACKAGES}
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"] or ""
    if PLUGIN.match(name):
      versions[name.lower()] = dist.version
  return versions


def jax_settings() -> dict[str, Any]:
  """The values in force of JAX_SETTINGS, and every JAX_* environment variable."""
  return {**{name: getattr(jax.config, name) for name in JAX_SETTINGS},
          "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("JAX_")}}


def describe(*, config: dict, dataset: Optional[dict], parallelism: str, command: Sequence[str]) -> dict[str, Any]:
  """Everything a row of RUNS holds but the step resumed from: what this process and its devices run, and on what."""
  device = jax.devices()[0]
  return {
      "run_id": uuid.uuid4().hex[:12],
      "code": code_version(),
      "python": platform.python_version(),
      "packages": package_versions(),
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_count": jax.process_count(),
      "parallelism": parallelism,
      "deterministic": runtime.is_deterministic(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_settings": jax_settings(),
      "command": list(command),
      "dataset": dataset,
      "config": config,
  }


def append(workdir: str, description: dict[str, Any], resumed_from: Optional[int]) -> dict[str, Any]:
  """Appends the row of a start (the description, when it started, the step it resumed from: None for a fresh
  run) to workdir's RUNS; returns the row."""
  start = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  row = {**description, "started": start, "resumed_from": resumed_from}
  f = storage.appender(os.path.join(workdir, RUNS))
  try:
    f.write(json.dumps(row, default=str) + "\n")  # settings such as enums as their names
  finally:
    f.close()
  return row


def read(workdir: str) -> list[dict[str, Any]]:
  """The rows of workdir's RUNS, oldest first (none when it has none; a torn last line is left out)."""
  path = os.path.join(workdir, RUNS)
  try:
    lines = storage.read_lines(path)
  except FileNotFoundError:
    return []
  rows = []
  for line in lines:
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def run_of_step(rows: Sequence[dict[str, Any]], step: int) -> Optional[dict[str, Any]]:
  """The row of the start that trained up to checkpoint `step`: the last one that started before it (None: none)."""
  before = [r for r in rows if (r.get("resumed_from") or 0) < step]
  return before[-1] if before else None
