"""Writes a workdir's model as a diffusers folder: `python tools/export_diffusers.py --workdir W --out PATH`.

PATH becomes a DDPMPipeline folder (model_index.json, unet/, scheduler/) that
`diffusers.DDPMPipeline.from_pretrained(PATH)` loads, with the run's noise schedule, prediction target and DDPM
sampler settings; with --unet_only, a UNet2DModel folder (`UNet2DModel.from_pretrained(PATH)`). The EMA parameters
of the latest checkpoint are written unless --checkpoint / --use_ema say otherwise. A U-Net that diffusers' blocks
cannot express (the book's) is refused with one line.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's ddpm_jax

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags

from ddpm_jax import builders, checkpoint, cli, pretrained, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run (or an imported one): its latest checkpoint is used.")
flags.DEFINE_string("checkpoint", None, "A checkpoint step folder (WORKDIR/checkpoints/STEP) instead of --workdir.")
flags.DEFINE_string("out", None, "The diffusers folder to write (new, or empty).")
flags.DEFINE_bool("use_ema", True, "Write the EMA parameters (false: the raw ones).")
flags.DEFINE_bool("unet_only", False, "Write a UNet2DModel folder alone, without the scheduler.")


def main(argv):
  del argv
  runtime.quiet_backend_discovery()
  runtime.quiet_orbax()
  with cli.one_line_errors("export_diffusers.py"):
    if not (FLAGS.workdir or FLAGS.checkpoint) or not FLAGS.out:
      raise ValueError("give --workdir (latest checkpoint) or --checkpoint WORKDIR/checkpoints/STEP, and --out")
    if os.path.exists(FLAGS.out) and (not os.path.isdir(FLAGS.out) or os.listdir(FLAGS.out)):
      raise ValueError(f"--out={FLAGS.out!r} exists and is not an empty folder: give a new one")
    workdir, step = checkpoint.locate(FLAGS.checkpoint or FLAGS.workdir)
    config, step = builders.load_run_config(workdir, step, FLAGS.use_ema)
    model = builders.build_model(config)
    pretrained.unet_config(model, config.image_size, config.data.channels)  # refuse before reading the arrays
    if not FLAGS.unet_only:
      pretrained.scheduler_config(config)
    params = builders.restore_sampling_params(config, workdir, step, ema=FLAGS.use_ema)
    pretrained.to_diffusers(model, params, FLAGS.out, None if FLAGS.unet_only else config,
                            image_size=config.image_size)
  kind = "UNet2DModel" if FLAGS.unet_only else "DDPMPipeline"
  print(f"wrote {FLAGS.out}: a diffusers {kind} folder of step {step}'s {'EMA' if FLAGS.use_ema else 'raw'} "
        f"parameters ({kind}.from_pretrained loads it)")


if __name__ == "__main__":
  app.run(main)
