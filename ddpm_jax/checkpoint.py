"""Orbax checkpoints of a TrainState (params, EMA params, optimizer state) plus the config that produced it.

Orbax writes each step into a temporary folder and renames it when complete
(in a bucket, gs://, into the step's folder, marked complete by a commit file
written last), so a checkpoint that is half written is never listed as the
latest. Saves are asynchronous: save returns once the arrays are copied to host
memory; the next save, or close, waits for the write and reports its failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import consensus, runtime, storage
from ddpm_jax.train_state import TrainState


def move_aside(manager: ocp.CheckpointManager, steps: Sequence[int]) -> list[str]:
  """Renames the damaged checkpoints `steps` to STEP.damaged (STEP.damaged.K when an older copy is there): no longer
  listed, not deleted, and the run writes those steps again. Returns the new names."""
  root, names = epath.Path(manager.directory), []
  for step in steps:
    target, k = root / f"{step}.damaged", 1
    while target.exists():
      target, k = root / f"{step}.damaged.{k}", k + 1
    (root / str(step)).rename(target)
    names.append(target.name)
  manager.reload()
  return names


def checkpoint_dir(workdir: str) -> str:
  """Where a workdir keeps its checkpoints."""
  return os.path.join(storage.absolute(workdir), "checkpoints")


ARRAY_ITEMS = ("params", "ema_params", "opt_state")  # a TrainState's arrays, one orbax item each; the step is the
# checkpoint's own step number


def make_manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over workdir/checkpoints keeping the last `keep` steps."""
  if keep < 1:
    raise ValueError(f"keep_checkpoints={keep!r} is invalid: keep at least 1")
  if create:  # a start removes what a failed save's late writer threads (or kill -9) left behind
    remove_leftovers(checkpoint_dir(workdir))
  barrier = _barrier_ending_on_own_failure(checkpoint_dir(workdir), lambda: manager.latest_step())
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, async_options=ocp.AsyncOptions(
      create_directories_asynchronously=False, barrier_sync_fn=barrier))
  handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
  handlers["config"] = ocp.JsonCheckpointHandler()
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)
  return manager  # (named: the barrier asks it for the step in flight)


def _barrier_ending_on_own_failure(directory: str, in_flight: Callable[[], Optional[int]]) -> Callable[..., None]:
  """orbax's barrier for its background threads (several processes), which first ends every process
  (consensus.fail_together, with a CheckpointError naming the step in flight) when this process's background write
  failed: orbax's finalize thread reaches a barrier while raising that failure, and would wait there, until orbax's
  timeout, for processes that wait for this one at another barrier. The writes of that save still in flight end
  first (up to ORBAX_THREADS_WAIT_S), so that the cleanup removes all of it."""
  sync = ocp.multihost.get_barrier_sync_fn()

  def barrier(*, key: str, timeout_ms: int) -> None:
    failure = sys.exc_info()[1]
    if failure is not None and jax.process_count() > 1 and threading.current_thread() is not threading.main_thread():
      _join_orbax_threads(ORBAX_THREADS_WAIT_S)  # its writes still in flight, which would outlive the cleanup
      consensus.fail_together(CheckpointError(
          f"could not write the checkpoint of step {in_flight()} to {directory}: {_cause(failure)}"))
    sync(key=key, timeout_ms=timeout_ms)

  return barrier


def all_finite(tree: Any) -> bool:
  """Whether every float in a pytree of host or global arrays is finite (with several processes a collective when
  the arrays span them)."""
  floats = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(getattr(x, "dtype", None) or np.asarray(x).dtype, jnp.floating)]
  local = [x for x in floats if not isinstance(x, jax.Array) or x.is_fully_addressable]
  spread = [x for x in floats if isinstance(x, jax.Array) and not x.is_fully_addressable]
  if spread and not bool(_all_finite_on_devices(spread)):
    return False
  return all(np.isfinite(np.asarray(x)).all() for x in local)


@jax.jit
def _all_finite_on_devices(arrays: list[jax.Array]) -> jax.Array:
  """Whether every element of the arrays is finite, computed where their shards are."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in arrays]))


class CheckpointError(Exception):
  """A checkpoint could not be written (a run-time failure)."""


class CheckpointReadError(ValueError):
  """A checkpoint could not be read: damaged, or written by another layout (bad input: exit 2, docs/architecture.md)."""


class CheckpointOutOfMemory(CheckpointError):
  """An intact checkpoint did not fit in memory while being restored (a run-time failure, not damage)."""


class CheckpointUnavailable(CheckpointError):
  """Reading a checkpoint kept failing in a way that can pass (a timeout, a lost connection): not damage."""


READ_TRIES = 3  # a transient read error is retried this many times in all, waiting READ_RETRY_S, then twice that
READ_RETRY_S = 1.0
# errno values of read failures that can pass by themselves: storage that is slow or briefly away
_TRANSIENT_ERRNOS = (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ESTALE)


def _transient(error: BaseException) -> bool:
  """Whether a read error can pass by itself (timeouts, lost connections, tensorstore's UNAVAILABLE or
  DEADLINE_EXCEEDED), as opposed to damage (a truncated or missing file, undecodable data)."""
  text = str(error)
  return (isinstance(error, (TimeoutError, ConnectionError)) or getattr(error, "errno", None) in _TRANSIENT_ERRNOS
          or "UNAVAILABLE" in text or "DEADLINE_EXCEEDED" in text)


def _read(read: Callable[[], Any], what: str) -> Any:
  """read(), retried on transient errors; CheckpointOutOfMemory when memory runs out, CheckpointUnavailable when the
  retries are spent, CheckpointReadError (damaged) for any other failure. `what` names the checkpoint."""
  for attempt in range(READ_TRIES):
    try:
      return read()
    except Exception as e:  # orbax and tensorstore raise many types
      if runtime.is_out_of_memory(e):
        raise CheckpointOutOfMemory(f"out of memory restoring {what} onto {jax.device_count()} device(s) (it is "
                                    f"intact): {runtime.OUT_OF_MEMORY_CURE}") from e
      if not _transient(e):
        raise CheckpointReadError(f"{what} could not be read: {_cause(e)}") from e
      if attempt + 1 == READ_TRIES:
        raise CheckpointUnavailable(f"{what} could not be read, {READ_TRIES} tries: {_cause(e)}; it was left as it "
                                    "is: try again when the storage answers") from e
      time.sleep(READ_RETRY_S * 2 ** attempt)


def _cause(error: BaseException) -> str:
  """A short reason for an I/O failure: disk full, no permission, or the first line of the error."""
  text = f"{type(error).__name__}: {error}"
  if runtime.is_out_of_memory(error):
    return "out of memory"
  if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text:  # tensorstore: the same words
    return "the disk is full"
  if getattr(error, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text \
      or "Read-only file system" in text:
    return "no permission to write there (or a read-only file system)"
  first = text.strip().splitlines()[0].split(" See full TensorStore details")[0]  # orbax appends a repr of a method
  return first if len(first) <= 300 else first[:300] + " ..."


def steps_on_disk(directory: str) -> list[int]:
  """The step folders a checkpoint folder holds, ascending: the disk's own listing (the manager's list can leave out
  a step still on disk, e.g. one it was about to delete when a save failed)."""
  folder = epath.Path(directory)
  found = folder.iterdir() if folder.is_dir() else []
  return sorted(int(p.name) for p in found if p.name.isdigit() and p.is_dir() and not _unfinished(p))


def _unfinished(path: epath.Path) -> bool:
  """Whether a folder in a checkpoint folder holds a save that did not complete: locally one of orbax's temporary
  folders (STEP.orbax-checkpoint-tmp-*); in a bucket (gs://), where orbax writes a step's folder in place and marks
  it complete with a commit_success.txt in it, a folder without that mark."""
  try:
    return ocp.step.is_tmp_checkpoint(path)
  except ValueError:  # removed meanwhile
    return False


ORBAX_THREADS_WAIT_S = 30.0  # the longest wait for orbax's threads still writing after a failed save


def _join_orbax_threads(timeout: float) -> None:
  """Waits, up to `timeout` s in all, for orbax's threads that outlive a failed save (serializing shardings, writing
  metadata): they still create files in its temporary folder."""
  deadline = time.time() + timeout
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
      with contextlib.suppress(Exception):  # orbax's threads re-raise their failure on join: already reported
        thread.join(max(0.0, deadline - time.time()))


def _remove_partial(manager: ocp.CheckpointManager) -> None:
  """Waits for orbax's writer threads, then deletes the temporary folders of saves that did not complete."""
  with contextlib.suppress(Exception):  # the failure is reported by the caller
    manager.wait_until_finished()
  _join_orbax_threads(ORBAX_THREADS_WAIT_S)
  remove_leftovers(str(manager.directory))


def remove_leftovers(directory: str) -> None:
  """Deletes the folders of unfinished saves in a checkpoint folder (_unfinished; process 0 only: another process
  may still be writing its shards); orbax never lists them as checkpoints."""
  if jax.process_index():
    return
  folder = epath.Path(directory)
  leftovers = lambda: [p for p in folder.iterdir() if _unfinished(p)] if folder.is_dir() else []
  for _ in range(20):  # tensorstore's writer threads can still be closing files: retry for up to 2 s
    for partial in leftovers():
      with contextlib.suppress(OSError):
        partial.rmtree()
    if not leftovers():
      return
    time.sleep(0.1)


def settle(manager: ocp.CheckpointManager, timeout: float) -> None:
  """Waits up to `timeout` s for the save in flight to finish or fail; a failure is left to its own report (the next
  wait or close), or to nobody on a process that is ending on another failure."""
  def wait_quietly() -> None:
    with contextlib.suppress(Exception):
      manager.wait_until_finished()

  waiter = threading.Thread(target=wait_quietly, name="ddpm_jax-settle", daemon=True)
  waiter.start()
  waiter.join(timeout)


def kept(directory: str) -> str:
  """What a stopped run leaves to resume from: 'kept: 5, 10' (the complete checkpoints) or 'kept: no checkpoint'."""
  return f"kept: {', '.join(map(str, steps_on_disk(directory))) or 'no checkpoint'}"


def close(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight, closes the manager and removes what a failed save left behind; CheckpointError
  (naming the step) when that save failed."""
  try:
    wait(manager)
  finally:
    with contextlib.suppress(Exception):
      manager.close()
    _remove_partial(manager)


def _write_error(manager: ocp.CheckpointManager, step: int, error: BaseException) -> CheckpointError:
  """The CheckpointError of a failed write of `step`, after removing its temporary folder: the step, the path, the
  cause and the checkpoints still on disk from before it (nothing from it or later is counted as kept)."""
  _remove_partial(manager)
  return CheckpointError(f"could not write the checkpoint of step {step} to {manager.directory}: {_cause(error)}; "
                         f"{kept(str(manager.directory))}")


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight (the manager lists its step, its latest, from the start of its write); a
  CheckpointError naming that step when its write failed."""
  step = manager.latest_step()
  try:
    manager.wait_until_finished()
  except Exception as e:  # orbax and tensorstore raise many types; every one means the write failed
    raise _write_error(manager, step, e) from e


def save(manager: ocp.CheckpointManager, state: TrainState, config: dict) -> None:
  """Starts saving a TrainState of host or global (possibly sharded) arrays at its step with the run's config, each
  process writing its own shards: it returns once the arrays are copied to host memory, and the write goes on in
  the background while training continues.

  First waits for the previous save. Refuses non-finite values
  (FloatingPointError). A failed write, this one's or the previous one's
  (reported here, or by close at the end), removes its temporary folder and
  raises CheckpointError naming that step, the path, the cause and the
  checkpoints kept before it.
  """
  wait(manager)
  step = int(state.step)
  arrays = {name: flax.serialization.to_state_dict(getattr(state, name)) for name in ARRAY_ITEMS}
  if not all_finite(arrays):
    raise FloatingPointError(f"refusing to save the checkpoint of step {step}: it holds NaN or Inf values")
  args = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
  try:
    manager.save(step, args=ocp.args.Composite(config=ocp.args.JsonSave(config), **args))
  except Exception as e:  # orbax and tensorstore raise many types; every one means the write failed
    raise _write_error(manager, step, e) from e


def _shapes(tree: Any) -> dict[str, tuple]:
  """'a/b/c' path -> shape of every leaf."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _step_or_latest(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
  """`step`, or the manager's latest step; a ValueError when there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"no checkpoint in {manager.directory}")
  return step


def _restore_items(manager: ocp.CheckpointManager, step: int, templates: dict[str, Any]) -> dict[str, Any]:
  """The named items of checkpoint `step`, shaped like their templates; a ValueError naming the first leaf whose
  shape differs (another model or optimizer config)."""
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # where leaves without a sharding go
  abstract = {name: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None) or here),
      flax.serialization.to_state_dict(t)) for name, t in templates.items()}
  what = f"checkpoint {step} in {manager.directory}"
  metadata = _read(lambda: manager.item_metadata(step), what)
  missing = [name for name in abstract if name not in metadata or metadata[name] is None]
  if missing:
    raise CheckpointReadError(f"checkpoint {step} in {manager.directory} has no {missing[0]!r} item: it was written "
                              "by an older ddpm_jax (one 'state' item) or is damaged; sample it with that release "
                              "or train again")
  for name, tree in abstract.items():
    saved, wanted = _shapes(metadata[name]), _shapes(tree)
    if saved != wanted:
      diff = sorted(set(saved) ^ set(wanted)) or sorted(k for k in saved if saved[k] != wanted[k])
      raise ValueError(f"checkpoint {step} in {manager.directory} was written by another model or optimizer config: "
                       f"{name}/{diff[0]} is {saved.get(diff[0], 'absent')} there and "
                       f"{wanted.get(diff[0], 'absent')} here")
  args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
  restored = _read(lambda: manager.restore(step, args=ocp.args.Composite(**args)), what)
  if not all_finite({name: restored[name] for name in templates}):
    raise CheckpointReadError(f"checkpoint {step} in {manager.directory} holds NaN or Inf values: it is damaged")
  return {name: flax.serialization.from_state_dict(templates[name], restored[name]) for name in templates}


def restore_state(manager: ocp.CheckpointManager, template: TrainState, step: Optional[int] = None) -> TrainState:
  """The TrainState of checkpoint `step` (default the latest), shaped like `template` (e.g. from jax.eval_shape),
  its arrays laid out as the template's shardings say (each process reading its own shards; leaves without one go
  to this process's first device)."""
  step = _step_or_latest(manager, step)
  items = _restore_items(manager, step, {name: getattr(template, name) for name in ARRAY_ITEMS})
  return template.replace(step=jnp.asarray(step, jnp.int32), **items)


def restore_params(manager: ocp.CheckpointManager, template: Any, step: Optional[int] = None,
                   ema: bool = True) -> Any:
  """Only the EMA parameters (or, with ema=False, the raw ones) of checkpoint `step` (default the latest)."""
  step = _step_or_latest(manager, step)
  name = "ema_params" if ema else "params"
  return _restore_items(manager, step, {name: template})[name]


def locate(path: str) -> tuple[str, Optional[int]]:
  """A workdir or one of its checkpoint step folders -> (workdir, step or None for the latest)."""
  path = storage.absolute(path)
  parent, leaf = os.path.split(path)
  if os.path.basename(parent) == "checkpoints":
    if not leaf.isdigit():
      raise ValueError(f"{path} is not a checkpoint step folder: give WORKDIR/checkpoints/STEP with a numeric STEP, "
                       "or the workdir")
    return os.path.dirname(parent), int(leaf)
  return path, None


def intact_steps(manager: ocp.CheckpointManager, restore: Any) -> list[int]:
  """The steps, newest first, for which restore(step) succeeds."""
  good = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restore(step)
      good.append(step)
    except CheckpointReadError:
      pass
  return good


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config saved with checkpoint `step`; CheckpointReadError when it cannot be read."""
  return _read(lambda: manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config,
               f"the config of checkpoint {step} in {manager.directory}")


def load_config(workdir: str, step: Optional[int] = None) -> tuple[dict, int]:
  """The config saved with a workdir's checkpoint (the latest, or `step`), and that step."""
  manager = make_manager(workdir, create=False) if epath.Path(checkpoint_dir(workdir)).is_dir() else None
  try:
    steps = manager.all_steps() if manager else []
    if not steps:
      raise ValueError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with "
                       f"`python train.py --workdir {workdir}`")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {checkpoint_dir(workdir)}: it holds steps "
                       f"{', '.join(map(str, sorted(steps)))}")
    return saved_config(manager, step), step
  finally:
    if manager:
      manager.close()
