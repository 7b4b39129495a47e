"""Converts the standard FID Inception weights (pytorch-fid's .pth) into ddpm_jax's msgpack format.

  pip install torch   # only this script needs it
  python tools/convert_inception_weights.py --torch pt_inception-2015-12-05-6726825d.pth --out inception_fid.msgpack

The .pth is the file pytorch-fid downloads (the TF 2015-12-05 FID graph's weights, ported). Then set
config.inception_weights (or sample.py --inception_weights) to the output file.
"""

import sys

from absl import app, flags

flags.DEFINE_string("torch", None, "The FID Inception state dict saved by PyTorch (.pth).", required=True)
flags.DEFINE_string("out", "inception_fid.msgpack", "Where to write the converted weights.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("convert_inception_weights.py: error: reading a .pth needs PyTorch: pip install torch", file=sys.stderr)
    sys.exit(2)
  from ddpm_jax import inception  # pylint: disable=g-import-not-at-top

  try:
    try:
      state = torch.load(FLAGS.torch, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"--torch={FLAGS.torch!r} could not be read as a PyTorch state dict: {e}") from e
    state = state.get("state_dict", state)
    variables = inception.from_torch_state_dict({k: v.float().numpy() for k, v in state.items()})
    inception.save_variables(variables, FLAGS.out)
  except ValueError as e:
    print(f"convert_inception_weights.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {FLAGS.out} (fingerprint {inception.weights_fingerprint(FLAGS.out)})")


if __name__ == "__main__":
  app.run(main)
