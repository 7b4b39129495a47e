"""The training loop: built parts in, checkpoints, metrics and periodic hooks out; resumable and preemptible."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax import checkpoint, consensus, parallel, plots, run_record, storage, workdir_lock
from ddpm_jax.parallel import Runner
from ddpm_jax.reporting import MetricWriter, format_eta
from ddpm_jax.train_state import TrainState


CURVES = "curves.png"  # the training-curve plot a finished run leaves in its workdir
CLASSES = "classes.json"  # a conditional run's label -> class name mapping, in its workdir
# What end-of-run work (the last step's hooks by name, then CURVES) a run that reached its last step has done:
# {"step": N, "done": [...]}. A restart at that step does the rest, so nothing is lost to a signal or a kill.
END_OF_RUN = "end_of_run.json"
# With several processes, a signal is agreed on by a collective at every step whose answer is read this many steps
# later (reading waits for it; a lag keeps the host that many steps ahead of the devices).
AGREEMENT_LAG = 2
# How long a process ending on a failure (its own or another's) waits for the checkpoint it is still writing: every
# process writes its shards of it and meets the others before it is complete, so each waits, up to this, before it
# leaves (a big state on a bucket can take minutes).
SAVE_WAIT_S = 600.0


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint."""

  def __init__(self, step: int, signum: int):
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved")
    self.step, self.signum = step, signum


@dataclasses.dataclass(frozen=True)
class Hook:
  """Work done every `every` steps and at the last step, given (step, host EMA params, metric writer or None).

  Every process runs it at the same step (it may hold collectives, e.g. a
  sampler over every device); the writer is None but on process 0, which
  alone writes files. At the last step it runs once: `name` records it done.
  """

  name: str
  every: int
  run: Callable[[int, Any, Optional[MetricWriter]], None]


@dataclasses.dataclass(frozen=True)
class Training:
  """Everything a run needs, built: the loop reads no config."""

  create_state: Callable[[], TrainState]  # a fresh state at step 0; jax.eval_shape of it is the restore template
  runner: Runner
  batches: Callable[[int], Iterator[np.ndarray]]  # this process's host batches from a start step on
  key: jax.Array  # the train steps' key (each step folds in its number)
  end_step: int  # num_train_steps, or an earlier stop (the schedules still span num_train_steps)
  batch_size: int  # global, for images/s
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  config: dict  # saved with every checkpoint, as config.json (the latest) and in the run record (every start's)
  # config -> what gives the parameters their meaning, by dotted key: a resume that changes any of it is refused
  parameter_meaning: Optional[Callable[[dict], dict[str, Any]]] = None
  hooks: tuple[Hook, ...] = ()
  wandb_project: Optional[str] = None  # also log to this Weights & Biases project (process 0)
  class_names: tuple[str, ...] = ()  # a conditional model's classes in label order, saved as classes.json
  record: Optional[dict] = None  # how the run is made (run_record.describe): a row of run_record.RUNS per start


def prefetch(iterator: Iterator[Any], put: Callable[[Any], Any], size: int = 2) -> Iterator[Any]:
  """Yields put(item) while the next `size` - 1 items are already being transferred."""
  queue: collections.deque = collections.deque()
  for item in iterator:
    queue.append(put(item))
    if len(queue) == size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def check_finite(rows: list[tuple[int, dict[str, float]]], newest_kept: Callable[[], Optional[int]]) -> None:
  """Raises FloatingPointError naming the first step whose loss is NaN or Inf, and the newest complete checkpoint
  (newest_kept(), asked only then)."""
  for step, m in rows:
    if not np.isfinite(m["loss"]):
      latest = newest_kept()
      kept = (f"the newest complete checkpoint, of step {latest}, predates it" if latest is not None
              else "no checkpoint was written")
      raise FloatingPointError(f"loss is {m['loss']} at step {step}: training stopped; {kept} (try a lower "
                               "optim.learning_rate or optim.grad_clip_norm=1.0)")


def check_same_meaning(saved: dict, current: dict, meaning: Callable[[dict], dict[str, Any]], where: str) -> None:
  """Raises ValueError naming the first field whose value gives the parameters another meaning in `current` than
  in the `saved` config of checkpoint `where` (a saved config too old to interpret is not compared)."""
  try:
    before = meaning(saved)
  except (AttributeError, KeyError, TypeError, ValueError):  # written by an older release: shapes are still checked
    return
  now = meaning(current)
  as_saved = lambda v: json.loads(json.dumps(v, default=str))  # tuples as JSON lists, dtypes as names
  for key, value in now.items():
    if key in before and as_saved(before[key]) != as_saved(value):
      raise ValueError(f"{where} was trained with {key}={as_saved(before[key])!r} and this run has {key}="
                       f"{as_saved(value)!r}: its parameters mean something else under another value; resume with "
                       "the checkpoint's value or give another --workdir")


def _restore_or_create(manager, create_state: Callable[[], TrainState], layout: Callable[[TrainState], TrainState],
                       config: Optional[dict] = None,
                       meaning: Optional[Callable[[dict], dict[str, Any]]] = None) -> TrainState:
  """The newest intact checkpoint's state, restored into the shapes alone (the model is not run) with the
  shardings `layout` gives them (leaves without one: onto the first device), or a fresh one. With `config` and
  `meaning`, a checkpoint whose saved config gives the parameters another meaning is refused (check_same_meaning).

  Process 0 lists the checkpoints, for every process. A checkpoint that cannot be read is reported and the next older
  one tried (moved aside as STEP.damaged once an intact one is found); when
  none can be read, CheckpointReadError. With several processes a damaged
  checkpoint is an error instead (on every process: consensus.fail_together).
  """
  steps = consensus.decide("resume/steps", lambda: sorted(manager.all_steps(), reverse=True))
  if not steps:
    return create_state()
  template = layout(jax.eval_shape(create_state))
  damaged = []
  for step in steps:
    where = f"checkpoint {step} in {manager.directory}"
    try:
      if config is not None and meaning is not None:  # on every process: orbax's reads end in a collective
        check_same_meaning(checkpoint.saved_config(manager, step), config, meaning, where)
      state = checkpoint.restore_state(manager, template, step)
    except checkpoint.CheckpointReadError as e:
      if jax.process_count() > 1:
        raise checkpoint.CheckpointReadError(f"{e} (on process {jax.process_index()}); move it aside to resume from "
                                             "an older one") from e
      print(f"warning: {e}; trying an older checkpoint", file=sys.stderr, flush=True)
      damaged.append(step)
      continue
    logging.info("resumed from the checkpoint of step %d in %s", step, manager.directory)
    if damaged:
      names = checkpoint.move_aside(manager, damaged)
      print(f"resuming from checkpoint {step}, the newest intact one; the damaged {', '.join(names)} stay in "
            f"{manager.directory}", file=sys.stderr, flush=True)
    return state
  raise checkpoint.CheckpointReadError(f"no checkpoint in {manager.directory} can be read (steps "
                                       f"{', '.join(map(str, steps))}): move the folder away to start afresh")


def end_of_run_done(workdir: str, step: int) -> list[str]:
  """The end-of-run work recorded as done in `workdir` by a run that reached `step` (none for another step)."""
  try:
    record = json.loads(epath.Path(workdir, END_OF_RUN).read_text(encoding="utf-8"))
  except (FileNotFoundError, ValueError):
    return []
  return list(record["done"]) if isinstance(record, dict) and record.get("step") == step else []


def _record_end_of_run(workdir: str, step: int, done: list[str]) -> None:
  """Writes the end-of-run record whole or not at all (a kill leaves the previous one)."""
  storage.write_atomic(os.path.join(workdir, END_OF_RUN), json.dumps({"step": step, "done": done}))


def _write_config(workdir: str, config: dict) -> None:
  """Writes config.json, the config of the latest start, warning which keys changed since the previous one (every
  start's config stays in the run record)."""
  path = epath.Path(workdir, "config.json")
  try:
    before = _flatten(json.loads(path.read_text(encoding="utf-8")))
  except (FileNotFoundError, ValueError, AttributeError):  # none yet, or not a config
    before = None
  after = _flatten(json.loads(json.dumps(config, default=str)))
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)) if before else []
  if changed:
    logging.warning("config.json: this start changes %s (every start's config is in %s)", ", ".join(changed),
                    run_record.RUNS)
  path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """A nested dict as {dotted key: leaf}."""
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return out


def _catch_signals(received: list[int]) -> dict:
  """Records SIGTERM / SIGINT in `received` instead of dying (main thread only); returns the previous handlers."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  return {sig: signal.signal(sig, lambda signum, _: received.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}


def _stop_signal(received: list[int], votes: collections.deque, agree: Optional[Callable[[int], jax.Array]]) -> int:
  """The signal to stop on after this step (0: none): this process's own, or with several processes the largest one
  any process had received AGREEMENT_LAG steps ago (all of them read the same answer at the same step)."""
  own = received[0] if received else 0
  if agree is None:
    return own
  votes.append(agree(own))
  return int(parallel.local_value(votes.popleft())) if len(votes) > AGREEMENT_LAG else 0


def _finish(t: Training, workdir: str, run_state: Any, writer: Optional[MetricWriter],
            stop_signal: Callable[[], int]) -> None:
  """Does the end-of-run work at t.end_step that the workdir's record lacks (the hooks due, then CURVES), recording
  each piece once done; a signal agreed on before a piece raises Interrupted (a restart does the rest)."""
  lead = jax.process_index() == 0
  done = consensus.decide("end_of_run", lambda: end_of_run_done(workdir, t.end_step))
  hooks = [h for h in t.hooks if h.every and h.name not in done]
  todo = hooks + ([] if CURVES in done else [CURVES])
  if not todo:
    logging.info("nothing to do: the run is complete at step %d (%s)", t.end_step, END_OF_RUN)
    return
  logging.info("end-of-run work at step %d: %s", t.end_step,
               ", ".join(piece if piece == CURVES else piece.name for piece in todo))
  ema_params = t.runner.get_state(run_state.ema_params) if hooks else None
  for piece in todo:
    signum = stop_signal()
    if signum:
      raise Interrupted(t.end_step, signum)
    if piece == CURVES:
      if lead:
        writer.flush()  # in a bucket, metrics.jsonl holds its last rows only once flushed
        plots.plot_training_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, CURVES))
    else:
      piece.run(t.end_step, ema_params, writer)
      parallel.barrier(f"end-of-run hook {piece.name}")
    done.append(piece if piece == CURVES else piece.name)
    if lead:
      _record_end_of_run(workdir, t.end_step, done)


def train(training: Training, workdir: str) -> TrainState:
  """Trains from workdir's latest checkpoint (or from scratch) to training.end_step, then does the end-of-run work
  (the last step's hooks, CURVES) not yet done; returns the host state.

  A failure first lets the checkpoint in flight finish (up to SAVE_WAIT_S),
  then removes half-written ones; its error gains a note of the complete
  checkpoints kept. Every cleanup runs whatever another one raises: the
  writer is closed, the signal handlers restored, the workdir lock released.
  """
  lead = jax.process_index() == 0
  made = not epath.Path(workdir).exists()  # by this run: removed again if it ends having written nothing
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with contextlib.ExitStack() as cleanups:
    # Before the manager, which clears unfinished saves: they may be another live run's.
    lock = workdir_lock.acquire(workdir) if lead else None
    parts: dict[str, Any] = {}  # "manager": the checkpoint manager; "writer", "lock": their closing, each run once
    if lock is not None:
      parts["lock"] = _once(lambda: _give_back(workdir, lock, made))
      cleanups.callback(parts["lock"])

    def abandon(failure: BaseException) -> str:
      """What a process ending on a failure through os._exit (which skips `cleanups`) still does: lets the save in
      flight finish (unless the failure is a failed write: a save that another process could not write never
      completes), removes half-written checkpoints, closes the writer, releases the lock; says what is kept."""
      manager = parts.get("manager")
      closing = [parts[k] for k in ("writer", "lock") if k in parts]
      wait_s = 0.0 if isinstance(failure, checkpoint.CheckpointError) else SAVE_WAIT_S
      for close in ([lambda: _settle(manager, wait_s)] if manager else []) + closing:
        with contextlib.suppress(Exception):
          close()
      return checkpoint.kept(str(manager.directory)) if manager else ""

    with consensus.cleanup(abandon):  # (the failing process's own ending included)
      try:
        return _run(training, workdir, parts, cleanups)
      except Exception as e:  # pylint: disable=broad-except
        if not isinstance(e, Interrupted):  # an agreed stop: every process raises it together
          consensus.fail_together(e)  # several processes: ends this one (abandon first)
          if "manager" in parts:  # one process: the same wait, then the same note
            _settle(parts["manager"])
            consensus.add_note(e, checkpoint.kept(str(parts["manager"].directory)))
        raise


def _once(fn: Callable[[], Any]) -> Callable[[], None]:
  """fn, run by the first call only (a closing that both the normal exit and the failure path may ask for)."""
  pending = [fn]
  return lambda: pending and pending.pop()()


def _settle(manager: Any, wait_s: float = SAVE_WAIT_S) -> None:
  """Lets the save in flight finish (up to wait_s), then removes what unfinished saves left."""
  checkpoint.settle(manager, wait_s)
  checkpoint.remove_leftovers(str(manager.directory))


def _give_back(workdir: str, lock: Any, made: bool) -> None:
  """Gives the workdir back: no checkpoints/ folder left empty by a run that saved nothing, the lock released, and no
  workdir left that this run made (`made`) and wrote nothing in."""
  folder = epath.Path(checkpoint.checkpoint_dir(workdir))
  local = not storage.is_remote(workdir)
  with contextlib.suppress(OSError):  # (a mount point, say: it stays)
    if local and folder.is_dir() and not any(folder.iterdir()):
      folder.rmdir()
  workdir_lock.release(lock)
  with contextlib.suppress(OSError):
    if made and local and [p.name for p in epath.Path(workdir).iterdir()] == [workdir_lock.LOCK_FILE]:
      epath.Path(workdir, workdir_lock.LOCK_FILE).unlink()
      epath.Path(workdir).rmdir()


class _Signals:
  """The stop signals, claimed while the run can stop on them at a step with a checkpoint (the loop's handlers
  record them in `received`), and given back to the handlers they had before."""

  def __init__(self) -> None:
    self.received: list[int] = []
    self._before: dict = {}

  def claim(self) -> None:
    """From now on a signal stops the run after the current step, with a checkpoint."""
    if not self._before:
      self._before = _catch_signals(self.received)

  def give_back(self) -> None:
    """Puts back the handlers from before claim."""
    for sig, handler in self._before.items():
      signal.signal(sig, handler)
    self._before = {}


def _run(t: Training, workdir: str, parts: dict[str, Any], cleanups: contextlib.ExitStack) -> TrainState:
  """train's work once the lock is held: each part it opens goes into `parts` and its closing into `cleanups` (the
  checkpoint manager closed after the input pipeline, the writer and the signal handlers)."""
  lead = jax.process_index() == 0
  manager = checkpoint.make_manager(workdir, t.keep_checkpoints)
  cleanups.callback(checkpoint.close, manager)
  state = _restore_or_create(manager, t.create_state, t.runner.restore_layout, t.config, t.parameter_meaning)
  parts["manager"] = manager  # from here on a failure waits for the save in flight and says what is kept
  if lead:
    if t.record is not None:
      run_record.append(workdir, t.record, int(state.step) or None)
    _write_config(workdir, t.config)
    if t.class_names:
      epath.Path(workdir, CLASSES).write_text(
          json.dumps({str(label): name for label, name in enumerate(t.class_names)}, indent=2), encoding="utf-8")
  start = int(state.step)
  if start > t.end_step:
    logging.info("nothing to do: the checkpoint is at step %d, the run ends at step %d", start, t.end_step)
    return t.runner.get_state(t.runner.put_state(state))
  run_state = t.runner.put_state(state)
  agree = parallel.make_agreement() if jax.process_count() > 1 else None
  # In one process, outside the steps (the first step's compile; the end-of-run work, once the last checkpoint is on
  # disk) signals keep their previous handlers, which may end the process at once. Several processes stop together
  # at a step: claimed throughout.
  signals = _Signals()
  cleanups.callback(signals.give_back)
  if agree:
    signals.claim()
  writer = MetricWriter(workdir, start, t.wandb_project, t.config) if lead else None
  if writer:
    parts["writer"] = _once(writer.close)
    cleanups.callback(parts["writer"])
  if start < t.end_step:
    batches = iter(prefetch(t.batches(start), t.runner.put_batch))
    # closes the input pipeline (and its worker processes) at the end, not during interpreter shutdown
    cleanups.callback(getattr(batches, "close", lambda: None))
    run_state = _train_steps(t, manager, run_state, batches, writer, signals, agree, start)
    checkpoint.wait(manager)  # the last checkpoint is on disk before the end-of-run work is recorded as done
  if not agree:
    signals.give_back()
  own = lambda: signals.received[0] if signals.received else 0
  _finish(t, workdir, run_state, writer, (lambda: int(parallel.local_value(agree(own())))) if agree else own)
  return t.runner.get_state(run_state)


def _newest_kept(manager: Any) -> Optional[int]:
  """The newest complete checkpoint's step, once the save in flight has finished (or after SAVE_WAIT_S)."""
  checkpoint.settle(manager, SAVE_WAIT_S)
  return max(checkpoint.steps_on_disk(str(manager.directory)), default=None)


def _compiled_together(step: Callable, *args: Any) -> Callable:
  """With several processes, the step compiled ahead on each, then run by none before every one has compiled it: the
  set-up of its first collective has a deadline (30 s for CPU collectives) that a process compiling for longer than
  another (a cold compilation cache on one host) would miss. With one process, or under pmap (whose ahead-of-time
  lowering takes the global shapes across processes), the step itself."""
  if jax.process_count() == 1 or not parallel.compiles_ahead(step):
    return step
  compiled = step.lower(*args).compile()
  consensus.wait_for_all("train step compiled")
  return compiled


def _train_steps(t: Training, manager: Any, run_state: Any, batches: Iterator[Any], writer: Optional[MetricWriter],
                 signals: _Signals, agree: Optional[Callable[[int], jax.Array]], start: int) -> Any:
  """The train steps from `start` to t.end_step with their logging, checkpoints and periodic hooks (those of the
  last step are _finish's); returns the state on the devices. Signals are claimed once the first step (its compile)
  is done; Interrupted is raised after the checkpoint of one."""
  lead = jax.process_index() == 0
  votes: collections.deque = collections.deque()
  pending: list[tuple[int, Any]] = []
  t_last, n_last = time.time(), start
  logging.info("training from step %d to %d on %d device(s) in %d process(es), global batch %d", start,
               t.end_step, jax.device_count(), jax.process_count(), t.batch_size)
  first = next(batches)
  step_fn = _compiled_together(t.runner.step, run_state, first, t.key)
  batches = itertools.chain([first], batches)
  for step in range(start, t.end_step):
    run_state, metrics = step_fn(run_state, next(batches), t.key)
    done = step + 1
    pending.append((done, metrics))
    if step == start:
      jax.block_until_ready(metrics)
      logging.info("first step (compile included) took %.1f s", time.time() - t_last)
      t_last, n_last = time.time(), done
      signals.claim()
    signum = _stop_signal(signals.received, votes, agree)
    if done == t.end_step and not signum:  # the votes not yet read: any signal until now stops at the last step
      signum = max([int(parallel.local_value(v)) for v in votes] + [0])
    stop = signum != 0
    log_now = done % t.log_every == 0 or done == t.end_step
    save_now = done % t.checkpoint_every == 0 or done == t.end_step or stop
    if log_now or save_now:
      rows = [(s, t.runner.get_metrics(m)) for s, m in pending]
      pending.clear()
      check_finite(rows, lambda: _newest_kept(manager))
      if log_now and lead:
        now = time.time()
        rate = (done - n_last) / max(now - t_last, 1e-9)
        t_last, n_last = now, done
        mean = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}
        writer.write(done, {**mean, "steps_per_s": rate, "images_per_s": rate * t.batch_size})
        print(f"step {done}/{t.end_step} | loss {mean['loss']:.4f} | grad_norm {mean['grad_norm']:.3f} | "
              f"lr {mean['lr']:.2e} | {rate:.2f} steps/s, {rate * t.batch_size:.0f} img/s | "
              f"ETA {format_eta((t.end_step - done) / max(rate, 1e-9))}", flush=True)
    if save_now:
      checkpoint.save(manager, t.runner.to_save(run_state), t.config)
    due = [h for h in t.hooks if h.every and done % h.every == 0 and done < t.end_step]
    if due:
      ema_params = t.runner.get_state(run_state.ema_params)
      for hook in due:
        hook.run(done, ema_params, writer)
      parallel.barrier(f"hooks of step {done}")
    if stop:
      raise Interrupted(done, signum)
  return run_state
