"""Process set-up shared by the entry points: ending on SIGINT / SIGTERM at once (and leaving them to the main process
in input workers), XLA's persistent compilation cache, deterministic settings, finding the cluster job this process
belongs to, JAX's backend discovery log, orbax's log and echoes, and which failures are out-of-memory errors.
Imports no JAX at load time: the entry points set up signals first, before the heavy imports."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Optional

# JAX's cluster detectors that train.py follows with no flags: Cloud TPU VMs (a pod slice's workers, on GCE or GKE),
# SLURM and Open MPI jobs.
CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")
DEFAULT_CACHE = os.path.join("~", ".cache", "ddpm_jax", "xla")  # overridden by JAX_COMPILATION_CACHE_DIR when set
DETERMINISTIC_OPS = "--xla_gpu_deterministic_ops=true"  # XLA's GPU kernels without atomics or run-dependent choices
FULL_PRECISION = ("float32", "highest")  # jax_default_matmul_precision values that keep float32 matmuls float32
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLEANUP_WAIT_S = 10.0  # the longest a process ending on a signal spends on its cleanup before it exits regardless
PARENT_POLL_S = 0.5  # how often a worker process checks that the main process is still there
_PARENT_WATCHED: list[int] = []  # a worker process's main process, once its watch has started


def stop_on_signals(program: str, cleanup: Callable[[], Optional[str]] = lambda: None,
                    deferred: str = "stopping at the next safe point; a second signal stops at once") -> None:
  """From now on SIGINT and SIGTERM end this process within moments, whatever its main thread is doing (an XLA
  compile or computation included): cleanup() (at most CLEANUP_WAIT_S), one line `PROGRAM: stopped by SIGNAL[; what
  cleanup returned]` on stderr, exit code 128 + N, no traceback. While other code has its own handler installed (the
  training loop between steps), the first signal is that code's to act on and is acknowledged here with `PROGRAM:
  SIGNAL received: DEFERRED`; a second one ends the process. Call from the main thread, before the heavy imports."""
  read, write = os.pipe()
  os.set_blocking(write, False)
  signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # C-level: written even while the main thread is in XLA

  def hold(signum: int, frame: object) -> None:  # the main thread, once it runs Python again: the watcher is ending
    del signum, frame
    threading.Event().wait()

  for sig in STOP_SIGNALS:
    signal.signal(sig, hold)

  def say(line: str) -> None:
    os.write(2, f"{program}: {line}\n".encode())

  def watch() -> None:
    deferred_once = False
    while True:
      signum = os.read(read, 1)[0]
      if signum not in STOP_SIGNALS:
        continue
      name = signal.Signals(signum).name
      if signal.getsignal(signum) is not hold and not deferred_once:  # the loop acts on it at its next step
        deferred_once = True
        say(f"{name} received: {deferred}")
        continue
      note = []

      def finish() -> None:
        with contextlib.suppress(Exception):  # ending regardless (e.g. a signal before the modules it uses loaded)
          for stream in (sys.stdout, sys.stderr):
            stream.flush()
          note.append(cleanup())

      worker = threading.Thread(target=finish, name="ddpm_jax-signal-cleanup", daemon=True)
      worker.start()
      worker.join(CLEANUP_WAIT_S)
      say(f"stopped by {name}" + (f"; {note[0]}" if note and note[0] else ""))
      os._exit(128 + signum)  # pylint: disable=protected-access  (no interpreter teardown under running XLA threads)

  threading.Thread(target=watch, name="ddpm_jax-signals", daemon=True).start()


def leave_signals_to_the_main_process(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
  """In a worker process (the input pipeline's): `signals` ignored, and the process ended once the main process is
  gone. A Ctrl-C reaches every process of the terminal's job, a scheduler's SIGTERM every process of the task: the
  main process decides how the run ends, still reads the batches it needs to finish its step and save, and may end
  through os._exit, which closes no worker. Ignoring SIGTERM suits only a main process that closes its input stream
  before it exits (multiprocessing's exit handler ends its children with SIGTERM and waits for them)."""
  for sig in signals:
    signal.signal(sig, signal.SIG_IGN)
  if _PARENT_WATCHED:
    return
  _PARENT_WATCHED.append(os.getppid())  # (if the main process has already gone, this is whoever adopted us: rare)

  def watch() -> None:
    while os.getppid() == _PARENT_WATCHED[0]:
      time.sleep(PARENT_POLL_S)
    os._exit(0)  # pylint: disable=protected-access  (the main process is gone: nothing to hand batches to)

  threading.Thread(target=watch, name="ddpm_jax-parent-watch", daemon=True).start()


def default_cache_dir() -> str:
  """JAX_COMPILATION_CACHE_DIR when the environment sets it, else ~/.cache/ddpm_jax/xla."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE


def enable_compilation_cache(path: Optional[str]) -> Optional[str]:
  """Keeps compiled XLA programs in `path` (created if needed) for later runs; "" or None leaves it off."""
  if not path:
    return None
  import jax  # pylint: disable=g-import-not-at-top  (see the module docstring)

  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the train step and samplers, not tiny ops
  return path


def make_deterministic() -> None:
  """Deterministic GPU kernels (DETERMINISTIC_OPS in XLA_FLAGS) and full float32 precision in every matmul and
  convolution (no TF32 or bf16 passes); called before JAX starts its backends, which read XLA_FLAGS once."""
  import jax  # pylint: disable=g-import-not-at-top  (see the module docstring)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (JAX has no public test for a started backend)

  if xla_bridge.backends_are_initialized():
    raise RuntimeError("make_deterministic() must run before JAX starts its backends: XLA has read XLA_FLAGS")
  flags = os.environ.get("XLA_FLAGS", "").split()
  if DETERMINISTIC_OPS not in flags:
    os.environ["XLA_FLAGS"] = " ".join(flags + [DETERMINISTIC_OPS])
  jax.config.update("jax_default_matmul_precision", "float32")


def is_deterministic() -> bool:
  """Whether make_deterministic's settings are in force (XLA_FLAGS and the default matmul precision)."""
  import jax  # pylint: disable=g-import-not-at-top  (see the module docstring)

  return (DETERMINISTIC_OPS in os.environ.get("XLA_FLAGS", "").split()
          and jax.config.jax_default_matmul_precision in FULL_PRECISION)


def detected_cluster() -> Optional[str]:
  """The name of the CLUSTERS environment JAX's cluster detection finds this process in, or None; also None, with a
  one-line note, when this JAX's (private) list of detectors cannot be read: then give the multi-process flags."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top  (JAX has no public list of its detectors)

    kinds = list(clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except (ImportError, AttributeError) as e:
    logging.getLogger(__name__).warning(
        "cannot read JAX's cluster detectors (%s): a multi-process job needs --coordinator_address, --num_processes "
        "and --process_id", e)
    return None
  # A detector without a name (K8sCluster in JAX 0.7.0) is not one of CLUSTERS.
  return next((env.name for env in kinds if getattr(env, "name", None) in CLUSTERS and env.is_env_present()), None)


def quiet_backend_discovery() -> None:
  """Keeps JAX's INFO lines about platforms it probed and did not find (`Unable to initialize backend 'tpu'` on
  every CPU or GPU machine) off stderr; its warnings and errors still show."""
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def quiet_storage_retries() -> None:
  """Keeps gcsfs's traceback of each request that failed after its retries off stderr: the exception reaches the
  caller, which reports it in one line (a bucket that cannot be reached printed two 25-line tracebacks first)."""
  logging.getLogger("gcsfs").addFilter(lambda record: not (record.exc_info and record.levelno >= logging.ERROR))


class _OrbaxFilter(logging.Filter):
  """Passes everything but orbax's INFO chatter and its errors: a failed save or restore reaches the user as one
  CheckpointError line instead of orbax's tracebacks from each of its threads, or from asyncio's report of an
  orbax task or future whose failure was already raised ("... exception was never retrieved")."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
      return False  # only orbax (and tensorstore under it) runs asyncio tasks in these programs
    return not _in_orbax(record.pathname) or record.levelno == logging.WARNING


def _in_orbax(path: str) -> bool:
  """Whether a source file belongs to orbax."""
  return f"{os.sep}orbax{os.sep}" in path


def _closed_loop_echo(error: BaseException) -> bool:
  """Whether an error is asyncio's "Event loop is closed", raised when tensorstore completes a read or write for an
  orbax call that already failed and closed its loop: an echo of an error already reported."""
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _orbax_coroutine(thing: object) -> bool:
  """Whether an object is one of orbax's coroutines: its exceptions that nobody awaited after an orbax call failed
  (e.g. reading the other slices of a damaged array) echo an error already reported."""
  code = getattr(thing, "cr_code", None)
  return code is not None and _in_orbax(code.co_filename)


def quiet_orbax() -> None:
  """Keeps orbax's per-save INFO chatter out of the absl log, and the echoes of a failed orbax call off stderr
  (entry points call this)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top  (see the module docstring)

  absl_logging.get_absl_handler().addFilter(_OrbaxFilter())
  # orbax's coroutines left behind by a failed save or read, collected at exit (only orbax runs coroutines in the
  # entry points)
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
  unraisable, thread_hook = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: None if _closed_loop_echo(u.exc_value) or _orbax_coroutine(u.object) else unraisable(u)
  threading.excepthook = lambda a: None if _closed_loop_echo(a.exc_value) else thread_hook(a)


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an error is running out of device or host memory (XLA's RESOURCE_EXHAUSTED about memory, or
  MemoryError), as opposed to a full disk (ENOSPC, which tensorstore also reports as RESOURCE_EXHAUSTED)."""
  text = str(error)
  if isinstance(error, MemoryError):
    return True
  return "RESOURCE_EXHAUSTED" in text and "No space left" not in text and "memory" in text.lower()


OUT_OF_MEMORY_CURE = ("shard the parameters, EMA and optimizer state over the devices with "
                      "--config.parallelism=fsdp, or lower --config.batch_size")
