"""A workdir's own config (its config.json, e.g. one tools/import_diffusers.py wrote), to resume or fine-tune it:

  python train.py --config configs/pretrained.py:W --workdir W --config.dataset=tfds:cifar10 \
      --config.optim.learning_rate=2e-5

Every key can be overridden on the command line, unset ones (null) with any value.
"""

import json

import ml_collections
from etils import epath
from ml_collections.config_dict import placeholder


def _typed(value):
  """A JSON value as a config value: objects as ConfigDicts, lists as tuples, null as an unset placeholder."""
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _typed(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(value)
  return placeholder(object) if value is None else value


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in WORKDIR/config.json."""
  return _typed(json.loads(epath.Path(workdir, "config.json").read_text(encoding="utf-8")))
