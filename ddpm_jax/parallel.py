"""Placing a pure train step on the devices: jit on one device; on several, pmap, or jit over a 1-D mesh with the
state replicated ("jit") or sharded ("fsdp"); programs split over the devices along their batch (the sampler, the
likelihood bound); and what several processes need beside it (moving pytrees between hosts and devices, the stop
vote, a barrier)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax.train_state import TrainState

AXIS = "batch"  # the pmap axis name that train_step averages gradients over
MESH_AXIS = "data"  # the 1-D mesh of the jit and fsdp modes
MODES = ("pmap", "jit", "fsdp")


@dataclasses.dataclass(frozen=True)
class Runner:
  """A compiled train step with the functions that move its state and batches to the devices and back.

  Every process calls each of them at the same points: with several
  processes, get_state, get_metrics and saving the to_save state may be
  collectives (they are under jit and fsdp).
  """

  step: Callable[[Any, Any, jax.Array], tuple[Any, dict]]  # (placed state, placed batch, key) -> (state, metrics)
  put_state: Callable[[TrainState], Any]  # host TrainState, or one restored in the restore_layout -> placed state
  put_batch: Callable[[Any], Any]  # this process's rows of the global batch (an array or a pytree) -> placed batch
  get_state: Callable[[Any], Any]  # placed state (or a part of it, e.g. its EMA params) -> host copy
  get_metrics: Callable[[dict], dict[str, float]]  # placed metrics -> host floats
  to_save: Callable[[Any], TrainState]  # placed state -> the arrays a checkpoint holds (each process writes its shards)
  restore_layout: Callable[[TrainState], TrainState]  # abstract state -> the same, with the shardings to restore into
  # abstract state -> the shardings to create it in (create_train_state's layout); None: on the default device
  state_shardings: Callable[[TrainState], Any]
  mode: str  # the placement in use: "single" (one device: plain jit) or one of MODES


def _first(tree: Any) -> Any:
  """This process's first device's copy of every leaf of a pmapped pytree, on the host.

  Reads an addressable shard: indexing the global array (x[0]) would be a
  computation that only the processes not holding device 0 wait in.
  """
  return jax.tree_util.tree_map(lambda x: local_value(x)[0], tree)


def host(tree: Any) -> Any:
  """Every leaf of a pytree of (possibly sharded, possibly multi-process) global arrays as a whole host array."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def place(tree: Any, shardings: Any) -> Any:
  """A pytree of host arrays (or arrays one process can read whole), or of global arrays already in the given
  shardings, as global arrays with those shardings (every process passes the same values; each puts only its own
  shards on its devices)."""

  def one(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree_util.tree_map(one, tree, shardings)


def fsdp_spec(shape: tuple[int, ...], devices: int) -> PartitionSpec:
  """Shards an array along its largest axis that the device count divides (the first such, on ties); replicated
  when none does."""
  axes = [a for a in sorted(range(len(shape)), key=lambda a: -shape[a]) if shape[a] % devices == 0]
  if not axes:
    return PartitionSpec()
  return PartitionSpec(*[MESH_AXIS if a == axes[0] else None for a in range(len(shape))])


def mesh_layout(devices: Sequence[jax.Device], sharded: bool) -> tuple[Callable[[Any], Any], NamedSharding,
                                                                        NamedSharding]:
  """On a 1-D mesh of `devices`: (state -> its shardings, replicated or fsdp; the batch's sharding, split along
  the mesh; the replicated sharding)."""
  mesh = Mesh(np.array(devices), (MESH_AXIS,))
  replicated = NamedSharding(mesh, PartitionSpec())
  n = len(devices)
  state_shardings = lambda state: jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n)) if sharded else replicated, state)
  return state_shardings, NamedSharding(mesh, PartitionSpec(MESH_AXIS)), replicated


def batch_programs(shard: Callable, devices: Sequence[jax.Device], sharded: int) -> Callable[[Any, bool], Callable]:
  """A cached (key impl, labelled) -> program: shard(params, key, offset, *arrays, labels) jitted over a 1-D mesh of
  `devices`, the params and the key's data whole on every device; offsets (one per device: the index of its first
  example), the `sharded` arrays and the labels (None when not labelled) split along their first axis; the outputs
  joined along theirs."""
  mesh = Mesh(np.array(devices), (MESH_AXIS,))

  @functools.lru_cache(maxsize=None)
  def program(impl: Any, labelled: bool) -> Callable:
    def body(params, key_data, offsets, *arrays):
      key = jax.random.wrap_key_data(key_data, impl=impl)
      return shard(params, key, offsets[0], *arrays, *(() if labelled else (None,)))
    specs = (PartitionSpec(),) * 2 + (PartitionSpec(MESH_AXIS),) * (1 + sharded + labelled)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(MESH_AXIS)))
  return program


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """A pytree of jax.ShapeDtypeStruct with the given shardings attached (what a restore should produce)."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _metrics(m: dict, get: Callable[[Any], Any]) -> dict[str, float]:
  """Placed metrics as host floats."""
  return {k: float(v) for k, v in get(m).items()}


def _unchanged(tree: Any) -> Any:
  """The tree itself."""
  return tree


def _default_device(abstract: Any) -> None:
  """No shardings: the state is created on the default device."""
  del abstract


def _single_runner(step_fn: Callable) -> Runner:
  """The step jitted for the one device there is (checkpoints restore onto it: the default of restore_state). The
  state is committed to it whole: a restored one mixes committed arrays with an uncommitted step, and the step's
  committed output would compile the train step a second time."""
  put_state = lambda state: jax.device_put(state, jax.devices()[0])
  return Runner(step=jax.jit(step_fn, donate_argnums=0), put_state=put_state, put_batch=jax.device_put,
                get_state=jax.device_get, get_metrics=lambda m: _metrics(m, jax.device_get), to_save=_unchanged,
                restore_layout=_unchanged, state_shardings=_default_device, mode="single")


def _pmap_runner(step_fn: Callable) -> Runner:
  """The step pmapped over this process's devices (and every process's, as one axis)."""
  n = jax.local_device_count()

  def put_batch(batch: Any) -> Any:
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if rows % n:
      raise ValueError(f"this process's batch of {rows} rows does not split over its {n} devices")
    return jax.tree_util.tree_map(lambda x: x.reshape((n, rows // n) + x.shape[1:]), batch)

  devices = jax.local_devices()
  stacked = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))  # pmap's layout of its inputs

  def replicate(x: Any) -> jax.Array:
    """One copy of x on each local device, stacked along a new leading axis (device to device: no host copy of a
    device array)."""
    x = jnp.asarray(x)
    return jax.make_array_from_single_device_arrays((n,) + x.shape, stacked,
                                                    [jax.device_put(x[None], d) for d in devices])

  step = jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=0)
  return Runner(step=step, put_state=lambda state: jax.tree_util.tree_map(replicate, state), put_batch=put_batch,
                get_state=_first, get_metrics=lambda m: _metrics(m, _first), to_save=_first,
                restore_layout=_unchanged, state_shardings=_default_device, mode="pmap")


class _MeshStep:
  """The jit / fsdp step, jitted with the shardings of the first state it meets (they depend on its structure);
  callable and lowerable like a jitted function."""

  def __init__(self, step_fn: Callable, state_shardings: Callable[[Any], Any], rows: NamedSharding,
               replicated: NamedSharding) -> None:
    self._step_fn, self._state_shardings, self._rows, self._replicated = step_fn, state_shardings, rows, replicated
    self.jitted: Any = None

  def jitted_for(self, state: Any) -> Any:
    """The jitted step for states of this structure (concrete or abstract), made on the first call."""
    if self.jitted is None:
      shardings = self._state_shardings(state)
      self.jitted = jax.jit(self._step_fn, in_shardings=(shardings, self._rows, self._replicated),
                            out_shardings=(shardings, self._replicated), donate_argnums=0)
    return self.jitted

  def __call__(self, state: Any, batch: jax.Array, key: jax.Array) -> tuple[Any, dict]:
    return self.jitted_for(state)(state, batch, key)

  def lower(self, state: Any, batch: jax.Array, key: jax.Array) -> Any:
    return self.jitted_for(state).lower(state, batch, key)


def compiles_ahead(step: Callable) -> bool:
  """Whether a Runner's step can be compiled ahead of its first call on every process (the jit and fsdp steps)."""
  return isinstance(step, _MeshStep)


def _mesh_runner(step_fn: Callable, sharded: bool) -> Runner:
  """The step jitted over a 1-D mesh of every device: the batch split along it, the state replicated or sharded."""
  state_shardings, rows, replicated = mesh_layout(jax.devices(), sharded)
  step = _MeshStep(step_fn, state_shardings, rows, replicated)

  def put_state(state: TrainState) -> Any:
    step.jitted_for(state)
    return place(state, state_shardings(state))

  return Runner(step=step, put_state=put_state,
                put_batch=lambda batch: jax.tree_util.tree_map(
                    lambda x: jax.make_array_from_process_local_data(rows, x), batch),
                get_state=host, get_metrics=lambda m: _metrics(m, host), to_save=_unchanged,
                restore_layout=lambda abstract: with_shardings(abstract, state_shardings(abstract)),
                state_shardings=state_shardings, mode="fsdp" if sharded else "jit")


def make_runner(step_fn: Callable[..., tuple[TrainState, dict]], mode: str = "pmap") -> Runner:
  """`step_fn(state, batch, key, axis_name=...)` placed on every device: plain jit when there is one, else `mode`:
  "pmap" (state replicated per device), "jit" (one program over a mesh, state replicated) or "fsdp" (the same,
  parameters, EMA and optimizer state sharded along their largest axis the device count divides)."""
  if mode not in MODES:
    raise ValueError(f"parallelism={mode!r} is unknown: choose one of {', '.join(MODES)}")
  if jax.device_count() == 1:
    return _single_runner(step_fn)
  if mode == "pmap":
    return _pmap_runner(step_fn)
  return _mesh_runner(step_fn, sharded=mode == "fsdp")


def make_agreement() -> Callable[[int], jax.Array]:
  """A collective that every process calls at the same step with its own value (e.g. the number of a signal it
  received, else 0): returns, without waiting, a replicated scalar holding the largest value over processes."""
  _, rows, replicated = mesh_layout(jax.devices(), sharded=False)
  largest = jax.jit(lambda votes: votes.max(), out_shardings=replicated)
  local = jax.local_device_count()
  return lambda value: largest(jax.make_array_from_process_local_data(rows, np.full(local, value, np.int32)))


def local_value(x: jax.Array) -> np.ndarray:
  """This process's first shard of a global array: the whole value when it is replicated (no collective)."""
  return np.asarray(x.addressable_shards[0].data)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
