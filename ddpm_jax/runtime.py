"""Process set-up shared by the entry points: XLA's persistent compilation cache, deterministic settings, finding the
cluster job this process belongs to, JAX's backend discovery log, and which failures are out-of-memory errors."""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

# JAX's cluster detectors that train.py follows with no flags: Cloud TPU VMs (a pod slice's workers, on GCE or GKE),
# SLURM and Open MPI jobs.
CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")
DEFAULT_CACHE = os.path.join("~", ".cache", "ddpm_jax", "xla")  # overridden by JAX_COMPILATION_CACHE_DIR when set
DETERMINISTIC_OPS = "--xla_gpu_deterministic_ops=true"  # XLA's GPU kernels without atomics or run-dependent choices
FULL_PRECISION = ("float32", "highest")  # jax_default_matmul_precision values that keep float32 matmuls float32


def default_cache_dir() -> str:
  """JAX_COMPILATION_CACHE_DIR when the environment sets it, else ~/.cache/ddpm_jax/xla."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
  """Keeps compiled XLA programs in `path` (created if needed) for later runs; "" or None leaves it off."""
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the train step and samplers, not tiny ops
  return path


def make_deterministic() -> None:
  """Deterministic GPU kernels (DETERMINISTIC_OPS in XLA_FLAGS) and full float32 precision in every matmul and
  convolution (no TF32 or bf16 passes); called before JAX starts its backends, which read XLA_FLAGS once."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (JAX has no public test for a started backend)

  if xla_bridge.backends_are_initialized():
    raise RuntimeError("make_deterministic() must run before JAX starts its backends: XLA has read XLA_FLAGS")
  flags = os.environ.get("XLA_FLAGS", "").split()
  if DETERMINISTIC_OPS not in flags:
    os.environ["XLA_FLAGS"] = " ".join(flags + [DETERMINISTIC_OPS])
  jax.config.update("jax_default_matmul_precision", "float32")


def is_deterministic() -> bool:
  """Whether make_deterministic's settings are in force (XLA_FLAGS and the default matmul precision)."""
  return (DETERMINISTIC_OPS in os.environ.get("XLA_FLAGS", "").split()
          and jax.config.jax_default_matmul_precision in FULL_PRECISION)


def detected_cluster() -> Optional[str]:
  """The name of the CLUSTERS environment JAX's cluster detection finds this process in, or None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  (JAX has no public list of its detectors)

  return next((env.name for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if env.name in CLUSTERS and env.is_env_present()), None)


def quiet_backend_discovery() -> None:
  """Keeps JAX's INFO lines about platforms it probed and did not find (`Unable to initialize backend 'tpu'` on
  every CPU or GPU machine) off stderr; its warnings and errors still show."""
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an error is running out of device or host memory (XLA's RESOURCE_EXHAUSTED about memory, or
  MemoryError), as opposed to a full disk (ENOSPC, which tensorstore also reports as RESOURCE_EXHAUSTED)."""
  text = str(error)
  if isinstance(error, MemoryError):
    return True
  return "RESOURCE_EXHAUSTED" in text and "No space left" not in text and "memory" in text.lower()


OUT_OF_MEMORY_CURE = ("shard the parameters, EMA and optimizer state over the devices with "
                      "--config.parallelism=fsdp, or lower --config.batch_size")
