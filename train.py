"""Trains a DDPM: `python train.py --config configs/default.py --workdir runs/default` (both are the defaults)."""

import errno
import os
import sys
import traceback

from ddpm_jax import runtime


def stopped_at_once() -> str:
  """The cleanup of a run a signal ends outside the loop's stopping points (the loop's own: half-written checkpoints
  removed, metrics flushed, lock released); says which checkpoints the workdir keeps."""
  consensus.run_cleanups(KeyboardInterrupt())
  return checkpoint.kept(checkpoint.checkpoint_dir(FLAGS.workdir))


# Before the imports below (seconds): a signal while they load, compile or run ends the process with one line. Not in
# the input pipeline's worker processes, which import this file as __mp_main__: a Ctrl-C reaches every process of the
# terminal's group, and the run's one line is the main process's.
if __name__ == "__main__":
  runtime.stop_on_signals("train.py", stopped_at_once,
                          "stopping after this step, with a checkpoint; a second signal stops at once, without it")
elif __name__ == "__mp_main__":  # a worker process, importing this file first of all
  runtime.leave_signals_to_the_main_process()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from ddpm_jax import builders, checkpoint, cli, consensus, loop

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.py")
cli.define_config_flag("train.py", DEFAULT_CONFIG,
                       "Experiment config file; fields override as --config.key=value.")
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics, samples and the config go here.")
flags.DEFINE_integer("stop_at_step", None, "Stop (with a checkpoint) at this step; schedules still span "
                     "config.num_train_steps.")
flags.DEFINE_string("compilation_cache", runtime.default_cache_dir(), "Folder of XLA's persistent compilation "
                    "cache, so that a second run of the same config starts in seconds; '' turns it off.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process (multi-host) runs; "
                    "not needed in a TPU pod slice, SLURM or Open MPI job, whose environment JAX reads.")
flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
flags.DEFINE_bool("deterministic", False, "Deterministic GPU kernels and full float32 matmul and convolution "
                  "precision (no TF32 / bf16 passes): slower; see docs/reproducibility.md.")
flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds after which the processes of a multi-process run give up on "
                     "one that stopped answering (it died) and end with an error instead of waiting for it.")


def report(error: BaseException) -> int:
  """Prints the line a run that ended on `error` leaves on stderr (a traceback first for an unexpected error) and
  returns its exit code: 2 for bad input, 1 for a run-time failure, 128 + N for signal N."""
  if isinstance(error, loop.Interrupted):
    print(f"train.py: {error}", file=sys.stderr)
    return 128 + error.signum
  if isinstance(error, OSError) and error.errno == errno.ENOSPC and not error.filename:  # a write into the workdir
    error, code = f"the disk is full: no space left to write in the workdir {FLAGS.workdir!r} ({error})", 1
  elif isinstance(error, ValueError):
    code = 2
  elif isinstance(error, (FloatingPointError, checkpoint.CheckpointError, OSError)):
    code = 1
  elif runtime.is_out_of_memory(error):  # XLA reports running out of device memory as a runtime error
    error, code = f"out of memory on the devices while training: {runtime.OUT_OF_MEMORY_CURE}", 1
  else:
    traceback.print_exception(error)
    error, code = f"{type(error).__name__}: {error}", 1
  print(f"train.py: error: {consensus.one_line(error) if isinstance(error, BaseException) else error}",
        file=sys.stderr)
  return code


def main(argv):
  del argv
  runtime.quiet_backend_discovery()
  runtime.quiet_storage_retries()
  if FLAGS.deterministic:
    runtime.make_deterministic()  # before anything starts JAX's backends
  if FLAGS.heartbeat_timeout < 1:
    print(f"train.py: error: --heartbeat_timeout={FLAGS.heartbeat_timeout} is invalid: give seconds >= 1",
          file=sys.stderr)
    sys.exit(2)
  explicit = FLAGS.coordinator_address is not None or FLAGS.num_processes > 1
  cluster = None if explicit else runtime.detected_cluster()
  if explicit or cluster:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                 heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    else:  # JAX reads the coordinator, the process count and this process's index from the job's environment
      jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
      logging.info("%s job detected: process %d of %d", cluster, jax.process_index(), jax.process_count())
    consensus.watch_failures(report)  # a failure on any process ends every process with its line and exit code
  runtime.quiet_orbax()
  runtime.enable_compilation_cache(FLAGS.compilation_cache)
  try:
    loop.train(builders.build_training(FLAGS.config, FLAGS.workdir, FLAGS.stop_at_step, sys.argv), FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, loop.Interrupted):
      consensus.fail_together(e)  # several processes: the failures the loop did not announce (before it, its last save)
    sys.exit(report(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("train.py", DEFAULT_CONFIG))
