"""Orbax checkpoints of a TrainState plus the config that produced it.

Orbax writes each step into a temporary folder and renames it when complete,
so a checkpoint that is half written is never listed as the latest.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp


class _DropOrbaxInfo(logging.Filter):
  """Passes warnings and errors, and INFO records from anything but orbax."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_info() -> None:
  """Keeps orbax's per-save INFO chatter out of the absl log (entry points call this)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.get_absl_handler().addFilter(_DropOrbaxInfo())


def checkpoint_dir(workdir: str) -> str:
  """Where a workdir keeps its checkpoints."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over workdir/checkpoints keeping the last `keep` steps."""
  if keep < 1:
    raise ValueError(f"keep_checkpoints={keep!r} is invalid: keep at least 1")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def all_finite(tree: Any) -> bool:
  """Whether every float in a pytree of host arrays is finite."""
  return all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def save(manager: ocp.CheckpointManager, state: Any, config_json: str) -> None:
  """Saves a host (unreplicated) TrainState at its step; refuses non-finite values."""
  state_dict = flax.serialization.to_state_dict(jax.device_get(state))
  step = int(state_dict["step"])
  if not all_finite(state_dict):
    raise FloatingPointError(f"refusing to save the checkpoint of step {step}: it holds NaN or Inf values")
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                                             config=ocp.args.JsonSave(json.loads(config_json))))


def _shapes(tree: Any) -> dict[str, tuple]:
  """'a/b/c' path -> shape of every leaf."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore(manager: ocp.CheckpointManager, template: Any, step: Optional[int] = None) -> tuple[Any, dict]:
  """(TrainState shaped like `template`, saved config dict) at `step` or the latest step.

  A checkpoint whose arrays differ from the template's (another model or
  optimizer config) is a ValueError naming the first difference.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {manager.directory}")
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                    flax.serialization.to_state_dict(template))
  saved, wanted = _shapes(manager.item_metadata(step)["state"]), _shapes(abstract)
  if saved != wanted:
    diff = sorted(set(saved) ^ set(wanted)) or sorted(k for k in saved if saved[k] != wanted[k])
    key = diff[0]
    raise ValueError(f"checkpoint {step} in {manager.directory} was written by another model or optimizer config: "
                     f"{key} is {saved.get(key, 'absent')} there and {wanted.get(key, 'absent')} here")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           config=ocp.args.JsonRestore()))
  return flax.serialization.from_state_dict(template, restored.state), restored.config


def locate(path: str) -> tuple[str, Optional[int]]:
  """A workdir or one of its checkpoint step folders -> (workdir, step or None for the latest)."""
  path = os.path.abspath(path)
  parent, leaf = os.path.split(path)
  if leaf.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(leaf)
  return path, None


def load_config(workdir: str, step: Optional[int] = None) -> dict:
  """The config saved with a workdir's checkpoint (the latest, or `step`)."""
  manager = make_manager(workdir, create=False) if os.path.isdir(checkpoint_dir(workdir)) else None
  try:
    steps = manager.all_steps() if manager else []
    if not steps:
      raise ValueError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with "
                       f"`python train.py --workdir {workdir}`")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {checkpoint_dir(workdir)}: it holds steps "
                       f"{', '.join(map(str, sorted(steps)))}")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  finally:
    if manager:
      manager.close()
