"""The default run, class-conditional: the embedded digits with their labels and classifier-free guidance.

`python train.py --config configs/digits_guided.py --workdir runs/guided`, then
`python sample.py --workdir runs/guided --labels 7` (or `0,3,9`, or `all`) and `--guidance W`.
The default guidance scale is the one the trade-off table of docs/results.md chose.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The guided digits experiment."""
  config = default.get_config()
  config.model.num_classes = 10  # the digits 0..9; row 10 of the label embedding means "no label"
  config.diffusion.cond_drop_prob = 0.1  # Ho & Salimans 2022: one label in ten dropped, so one model learns both
  config.sample.guidance_scale = 1.25  # docs/results.md: the largest scale whose Fréchet ratio stays below 1
  return config
