"""Trains a DDPM: `python train.py --config configs/default.py --workdir runs/default` (both are the defaults)."""

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from ddpm_jax import builders, checkpoint, loop

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(HERE, "configs", "default.py"),
                                "Experiment config file; fields override as --config.key=value.")
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics, samples and the config go here.")
flags.DEFINE_integer("stop_at_step", None, "Stop (with a checkpoint) at this step; schedules still span "
                     "config.num_train_steps.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process (multi-host) runs.")
flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")


def main(argv):
  del argv
  if FLAGS.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  checkpoint.quiet_orbax_info()
  try:
    loop.train(builders.build_training(FLAGS.config, FLAGS.workdir, FLAGS.stop_at_step), FLAGS.workdir)
  except ValueError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  except loop.Interrupted as e:
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
  app.run(main)
