"""Makes a workdir of a diffusers DDPM checkpoint: `python tools/import_diffusers.py PATH --workdir W`.

PATH is a pipeline folder (model_index.json, unet/, scheduler/), e.g. google/ddpm-cifar10-32 as
`huggingface-cli download` fetches it, or a UNet2DModel folder. W gets a checkpoint of step 0 whose parameters and
EMA parameters are the checkpoint's weights (with a fresh optimizer state) and config.json. Then
`python sample.py --workdir W` samples it and
`python train.py --config configs/pretrained.py:W --workdir W --config.dataset=...` fine-tunes it.

The U-Net, image size, channels, noise schedule, prediction target and DDPM sampler settings come from the checkpoint;
everything else (dataset, optimizer, EMA, evaluation) from --config (default configs/cifar10.py), whose keys can be
overridden as --config.key=value. config.pretrained records the source folder and its weights' SHA-256.
"""

import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's ddpm_jax, and configs.common that the config files import

# pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
from absl import app, flags
from etils import epath

from configs import common
from ddpm_jax import builders, checkpoint, cli, preflight, pretrained, runtime
from ddpm_jax.train_state import state_from_params
from ddpm_jax.unet import count_params

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "cifar10.py")
flags.DEFINE_string("workdir", None, "The workdir to make (new, or without checkpoints).")
cli.define_config_flag("import_diffusers.py", DEFAULT_CONFIG, "Experiment config for everything the "
                       "checkpoint does not say (dataset, optimizer, EMA, evaluation); --config.key=value.")


def sha256(path: str) -> str:
  """The SHA-256 of a file, hex."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def imported_config(base: ml_collections.ConfigDict, path: str, spec: pretrained.UNetSpec) -> ml_collections.ConfigDict:
  """`base` with the checkpoint's model, image shape, schedule and sampler settings, and its source recorded."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.model = common.model(pretrained.BASE_PRESET, **spec.fields)
  config.image_size = spec.image_size
  config.data.channels = spec.in_channels
  if pretrained.has_scheduler(path):
    for key, value in pretrained.diffusion_settings(path).items():
      section, name = key.split(".")
      config[section][name] = value
  folder = pretrained.unet_folder(path)
  weights = next(n for n in (pretrained.SAFETENSORS, pretrained.TORCH_BIN) if os.path.isfile(os.path.join(folder, n)))
  config.pretrained = ml_collections.ConfigDict({
      "format": "diffusers", "source": os.path.abspath(path), "weights": os.path.relpath(os.path.join(folder, weights),
                                                                                         path),
      "sha256": sha256(os.path.join(folder, weights)), "scheduler": pretrained.has_scheduler(path)})
  return config


def main(argv):
  runtime.quiet_backend_discovery()
  runtime.quiet_orbax()
  with cli.one_line_errors("import_diffusers.py"):
    if len(argv) != 2:
      raise ValueError("give one diffusers folder: python tools/import_diffusers.py PATH --workdir W")
    if not FLAGS.workdir:
      raise ValueError("give --workdir, the workdir to make")
    path, workdir = argv[1], FLAGS.workdir
    preflight.check_workdir(workdir)
    if checkpoint.steps_on_disk(checkpoint.checkpoint_dir(workdir)):
      raise ValueError(f"workdir {workdir!r} already holds checkpoints: give a new --workdir")
    model, params, spec = pretrained.read_unet(path)
    config = imported_config(FLAGS.config, path, spec)
    replaced = [f"{key}={given} by {wanted}" for key, given, wanted in (
        ("image_size", FLAGS.config.image_size, spec.image_size),
        ("data.channels", FLAGS.config.data.channels, spec.in_channels)) if given != wanted]
    if replaced:  # the network's shape wins over --config's
      print(f"import_diffusers.py: the checkpoint's shape replaces --config's {', '.join(replaced)}: the dataset is "
            "read at that shape", file=sys.stderr)
    builders.validate(config)
    state = state_from_params(model, builders.build_optimizer(config), params)
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    try:
      checkpoint.save(manager, state, config.to_dict())
    finally:
      checkpoint.close(manager)
    epath.Path(workdir, "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
  if not config.pretrained.scheduler:
    print(f"import_diffusers.py: {path} has no scheduler config: the noise schedule and sampler settings are "
          "--config's", file=sys.stderr)
  print(f"wrote {workdir}: a step-0 checkpoint of {path} ({count_params(params):,} parameters, "
        f"{spec.image_size}x{spec.image_size}x{spec.in_channels}, schedule {config.diffusion.schedule}, "
        f"{config.sample.variance} variance)\n"
        f"  sample:    python sample.py --workdir {workdir}\n"
        f"  fine-tune: python train.py --config configs/pretrained.py:{workdir} --workdir {workdir} "
        "--config.dataset=... --config.optim.learning_rate=...")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("import_diffusers.py", DEFAULT_CONFIG))
