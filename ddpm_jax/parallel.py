"""Placing a pure train step on the devices: jit on one device, pmap over all devices of all processes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from ddpm_jax.train_state import TrainState

AXIS = "batch"  # the pmap axis name that train_step averages gradients over


@dataclasses.dataclass(frozen=True)
class Runner:
  """A compiled train step with the functions that move its state and batches to the devices and back."""

  step: Callable[[Any, Any, jax.Array], tuple[Any, dict]]  # (placed state, placed batch, key) -> (state, metrics)
  put_state: Callable[[TrainState], Any]  # host TrainState -> placed state
  put_batch: Callable[[np.ndarray], Any]  # this process's rows of the global batch -> placed batch
  get_state: Callable[[Any], TrainState]  # placed state -> host TrainState
  get_metrics: Callable[[dict], dict[str, float]]  # placed metrics -> host floats


def _first(tree: Any) -> Any:
  """This process's first device's copy of every leaf of a pmapped pytree, on the host.

  Reads an addressable shard: indexing the global array (x[0]) would be a
  computation that only the processes not holding device 0 wait in.
  """
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def make_runner(step_fn: Callable[..., tuple[TrainState, dict]]) -> Runner:
  """`step_fn(state, batch, key, axis_name=...)` placed on every device: jit when there is one, else pmap.

  With pmap the state is replicated on this process's devices and its rows
  of the global batch are split evenly over them.
  """
  if jax.device_count() == 1:
    return Runner(step=jax.jit(step_fn, donate_argnums=0), put_state=jax.device_put, put_batch=jax.device_put,
                  get_state=jax.device_get,
                  get_metrics=lambda m: {k: float(v) for k, v in jax.device_get(m).items()})
  n = jax.local_device_count()

  def put_batch(batch: np.ndarray) -> np.ndarray:
    if batch.shape[0] % n:
      raise ValueError(f"this process's batch of {batch.shape[0]} rows does not split over its {n} devices")
    return batch.reshape((n, batch.shape[0] // n) + batch.shape[1:])

  replicate = lambda state: jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
  step = jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=0)
  return Runner(step=step, put_state=replicate, put_batch=put_batch, get_state=_first,
                get_metrics=lambda m: {k: float(v) for k, v in _first(m).items()})
