"""Process set-up shared by the entry points: XLA's persistent compilation cache, and finding the cluster job this
process belongs to."""

from __future__ import annotations

import os
from typing import Optional

import jax

# JAX's cluster detectors that train.py follows with no flags: Cloud TPU VMs (a pod slice's workers, on GCE or GKE),
# SLURM and Open MPI jobs.
CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")
DEFAULT_CACHE = os.path.join("~", ".cache", "ddpm_jax", "xla")  # overridden by JAX_COMPILATION_CACHE_DIR when set


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


def detected_cluster() -> Optional[str]:
  """The name of the CLUSTERS environment JAX's cluster detection finds this process in, or None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  (JAX has no public list of its detectors)

  return next((env.name for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
               if env.name in CLUSTERS and env.is_env_present()), None)
