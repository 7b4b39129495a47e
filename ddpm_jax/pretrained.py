"""diffusers checkpoints in and out: a UNet2DModel folder (or a DDPM pipeline's) as a UNet and its parameters, a
scheduler config as a Schedule and sampler settings, and the way back. No PyTorch is needed either way.

Every error a folder can cause is one ValueError line naming the file, or the
config field and the value ddpm_jax's UNet cannot express.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
import safetensors.numpy

from ddpm_jax import torch_zip
from ddpm_jax.schedule import Schedule, make_schedule
from ddpm_jax.train_state import init_params
from ddpm_jax.unet import UNet, unet_preset

UNET_CONFIG = "config.json"
SAFETENSORS = "diffusion_pytorch_model.safetensors"
TORCH_BIN = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_INDEX = "model_index.json"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose folders these were checked against (its _diffusers_version)
BASE_PRESET = "ddpm_cifar10"  # the preset an imported UNet starts from (its initialisation, for fine-tuning)

# The UNet2DModel config fields with no default that suits (diffusers' own defaults are not the DDPM models').
UNET_REQUIRED = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "sample_size")
# diffusers' defaults of the other fields: what it takes when a config (written before the field existed) has none.
UNET_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
    "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
# Fields whose every allowed value is listed: the DDPM U-Net's (act_fn "swish" is diffusers' other name for SiLU).
UNET_FIXED = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",), "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,), "downsample_padding": (0, 1), "downsample_type": ("conv",),
    "upsample_type": ("conv",), "act_fn": ("silu", "swish"), "resnet_time_scale_shift": ("default",),
    "add_attention": (True,), "class_embed_type": (None,),
}
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")

# diffusers' DDPMScheduler defaults, and its names for ours
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
SPACINGS = ("leading", "trailing", "linspace")

# our module names -> diffusers' (the levels' blocks are matched by pattern in _module_key)
_TOP = {"stem": "conv_in", "temb_dense_0": "time_embedding.linear_1", "temb_dense_1": "time_embedding.linear_2",
        "label_embed": "class_embedding", "mid_res_0": "mid_block.resnets.0", "mid_attn": "mid_block.attentions.0",
        "mid_res_1": "mid_block.resnets.1", "head_norm": "conv_norm_out", "head_conv": "conv_out"}
_RES = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj", "GroupNorm_1": "norm2",
        "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
_ATTN = {"GroupNorm_0": "group_norm", "Dense_0": ("to_q", "to_k", "to_v"), "Dense_1": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class UNetSpec(NamedTuple):
  """What a UNet2DModel config says in ddpm_jax's terms."""

  fields: dict  # UNet fields, over BASE_PRESET's
  image_size: int
  in_channels: int


def read_json(path: str) -> dict:
  """A JSON object from a file; ValueError naming the file when it is missing or not a JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path} does not exist") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} cannot be read as JSON: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds no JSON object")
  return value


def unet_folder(path: str) -> str:
  """The UNet2DModel folder of a model folder (itself) or of a pipeline folder (its unet/)."""
  if os.path.isfile(os.path.join(path, PIPELINE_INDEX)):
    return os.path.join(path, "unet")
  if os.path.isfile(os.path.join(path, UNET_CONFIG)):
    return path
  raise ValueError(f"{path} is not a diffusers folder: it has neither {UNET_CONFIG} (a UNet2DModel) nor "
                   f"{PIPELINE_INDEX} (a pipeline)")


def unet_spec(config: Mapping[str, Any], where: str = UNET_CONFIG) -> UNetSpec:
  """The UNet fields, image size and input channels of a diffusers UNet2DModel config; ValueError naming the field
  for anything ddpm_jax's UNet cannot express."""
  missing = [key for key in UNET_REQUIRED if key not in config]
  if missing:
    raise ValueError(f"{where} lacks {missing[0]!r}: a UNet2DModel config needs {', '.join(UNET_REQUIRED)}")
  c = {**UNET_DEFAULTS, **config}

  def refuse(key: str, allowed: str) -> ValueError:
    return ValueError(f"{where}: {key}={c[key]!r} cannot be expressed by ddpm_jax's UNet: {allowed}")

  if c.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise refuse("_class_name", "only UNet2DModel is read")
  for key, allowed in UNET_FIXED.items():
    if c[key] not in allowed:
      raise refuse(key, f"allowed: {', '.join(map(repr, allowed))}")
  widths, down, up = c["block_out_channels"], c["down_block_types"], c["up_block_types"]
  if not (isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
    raise refuse("block_out_channels", "a list of positive widths")
  base, levels = widths[0], len(widths)
  if base % 2 or any(w % base for w in widths):
    raise refuse("block_out_channels", "an even first width that divides every other")
  for key, blocks, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
    if not isinstance(blocks, list) or len(blocks) != levels:
      raise refuse(key, f"one block per width of block_out_channels ({levels})")
    bad = [b for b in blocks if b not in allowed]
    if bad:
      raise ValueError(f"{where}: {key} holds {bad[0]!r}, a block ddpm_jax's UNet does not have: allowed are "
                       f"{', '.join(allowed)}")
  size = c["sample_size"]
  if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
    size = size[0]
  if not isinstance(size, int) or size < 1 or size % 2 ** (levels - 1):
    raise refuse("sample_size", f"a square size divisible by 2^{levels - 1}")
  if c["time_embedding_dim"] not in (None, 4 * base):
    raise refuse("time_embedding_dim", f"None or {4 * base} (4 x the first width)")
  if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
    raise refuse("attn_norm_num_groups", f"None or norm_num_groups ({c['norm_num_groups']})")
  down_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
  up_levels = [levels - 1 - j for j, b in enumerate(up) if b == "AttnUpBlock2D"]
  head_dim = c["attention_head_dim"]
  attn_widths = {widths[i] for i in down_levels + up_levels} | {widths[-1]}  # the middle always attends
  heads = {1} if head_dim is None else {w // head_dim if isinstance(head_dim, int) and head_dim > 0
                                        and w % head_dim == 0 else None for w in attn_widths}
  if len(heads) != 1 or None in heads:
    raise refuse("attention_head_dim", f"None (one head) or a divisor of every attention block's width "
                 f"({', '.join(map(str, sorted(attn_widths)))}) giving each the same number of heads")
  classes = c["num_class_embeds"]
  if classes is not None and (not isinstance(classes, int) or classes < 2):
    raise refuse("num_class_embeds", "None, or at least 2 (the classes and a last 'no label' row)")
  down_res, up_res = tuple(size >> i for i in down_levels), tuple(size >> i for i in sorted(up_levels))
  fields = dict(
      base_channels=base, channel_mult=tuple(w // base for w in widths), num_res_blocks=c["layers_per_block"],
      attn_resolutions=down_res, up_attn_resolutions=None if up_res == down_res else up_res, attn_every_block=True,
      num_heads=heads.pop(), head_dim=None, attn_norm="group", attn_qkv_bias=True, dropout=float(c["dropout"]),
      norm_groups=c["norm_num_groups"], block_order="pre", double_temb_silu=False, downsample="conv",
      downsample_padding=c["downsample_padding"], norm_eps=float(c["norm_eps"]),
      flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]), topology="ddpm",
      out_channels=None if c["out_channels"] == c["in_channels"] else c["out_channels"],
      num_classes=0 if classes is None else classes - 1)
  return UNetSpec(fields, size, c["in_channels"])


def unet_config(model: UNet, image_size: int, in_channels: int) -> dict:
  """The diffusers UNet2DModel config of one of our UNets; ValueError naming the field diffusers' blocks cannot
  express."""
  def refuse(field: str, why: str) -> ValueError:
    return ValueError(f"UNet {field}={getattr(model, field)!r} has no diffusers UNet2DModel equivalent: {why}")

  for field, wanted, why in (
      ("topology", "ddpm", "diffusers' blocks are the DDPM paper's (the book's U-Net is not)"),
      ("block_order", "pre", "diffusers' residual blocks are norm-act-conv"),
      ("attn_norm", "group", "diffusers' attention blocks use GroupNorm (the book's LayerNorm attention is not)"),
      ("attn_qkv_bias", True, "diffusers' attention projections have biases"),
      ("attn_every_block", True, "diffusers' attention blocks attend after every residual block"),
      ("double_temb_silu", False, "diffusers applies SiLU to the time embedding once per block"),
      ("downsample", "conv", "diffusers downsamples with a strided conv")):
    if getattr(model, field) != wanted:
      raise refuse(field, why)
  model.validate((1, image_size, image_size, in_channels))
  widths = [model.base_channels * m for m in model.channel_mult]
  levels = len(widths)
  down = [image_size >> i in model.attn_resolutions for i in range(levels)]
  up_where = model.attn_resolutions if model.up_attn_resolutions is None else model.up_attn_resolutions
  up = [image_size >> i in up_where for i in range(levels)]
  attn_widths = {w for w, d, u in zip(widths, down, up) if d or u} | {widths[-1]}
  inner = {model.num_heads * (model.head_dim or w // model.num_heads) for w in attn_widths}
  if inner != attn_widths or any(w % model.num_heads for w in attn_widths):
    raise refuse("head_dim", "diffusers' attention keeps each block's width")
  if model.num_heads > 1 and len(attn_widths) > 1:
    raise refuse("num_heads", f"diffusers fixes the head width, so several heads need every attention block at one "
                 f"width (here {sorted(attn_widths)})")
  return {
      "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": image_size,
      "in_channels": in_channels, "out_channels": model.out_channels or in_channels, "center_input_sample": False,
      "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": model.freq_shift,
      "flip_sin_to_cos": model.flip_sin_to_cos,
      "down_block_types": [DOWN_BLOCKS[a] for a in down], "mid_block_type": "UNetMidBlock2D",
      "up_block_types": [UP_BLOCKS[a] for a in reversed(up)], "block_out_channels": widths,
      "layers_per_block": model.num_res_blocks, "mid_block_scale_factor": 1,
      "downsample_padding": model.downsample_padding, "downsample_type": "conv", "upsample_type": "conv",
      "dropout": model.dropout, "act_fn": "silu",
      "attention_head_dim": None if model.num_heads == 1 else widths[-1] // model.num_heads,
      "norm_num_groups": model.norm_groups, "attn_norm_num_groups": None, "norm_eps": model.norm_eps,
      "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
      "num_class_embeds": model.num_classes + 1 if model.num_classes else None, "num_train_timesteps": None,
  }


def _module_key(module: str, levels: int) -> str:
  """diffusers' name of one of our UNet's top-level modules."""
  if module in _TOP:
    return _TOP[module]
  side, level, kind, index = re.fullmatch(r"(down|up)_(\d+)_(res|attn|downsample|upsample)(?:_(\d+))?",
                                          module).groups()
  block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{levels - 1 - int(level)}"
  if kind in ("downsample", "upsample"):
    return f"{block}.{kind}rs.0.conv"
  return f"{block}.{'resnets' if kind == 'res' else 'attentions'}.{index}"


def _torch_keys(path: tuple[str, ...], levels: int) -> list[str]:
  """The diffusers state-dict keys of one of our parameters (three for an attention block's fused q, k, v)."""
  *modules, leaf = path
  prefix = _module_key(modules[0], levels)
  subs: Any = [""]
  if len(modules) == 2:
    sub = (_ATTN if "attn" in modules[0] else _RES)[modules[1]]
    subs = [f".{s}" for s in (sub if isinstance(sub, tuple) else (sub,))]
  suffix = "bias" if leaf == "bias" else "weight"  # kernel, scale, embedding
  return [f"{prefix}{s}.{suffix}" for s in subs]


def _to_flax(array: np.ndarray) -> np.ndarray:
  """A PyTorch weight in Flax's layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T if array.ndim == 2 else array


def _to_torch(array: np.ndarray) -> np.ndarray:
  """A Flax weight in PyTorch's layout (the inverse of _to_flax)."""
  return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T if array.ndim == 2 else array


def _renamed(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A state dict with the older attention names (query, key, value, proj_attn) as today's (to_q ... to_out.0)."""
  out = {}
  for key, value in state.items():
    new = re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.", lambda m: m[1] + _LEGACY_ATTN[m[2]] + ".", key)
    if new in out:
      raise ValueError(f"the weights hold both {key} and {new}, the older and the current name of one weight")
    out[new] = value
  return out


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """The weights of a UNet2DModel folder (safetensors, else PyTorch's .bin read without PyTorch)."""
  path = os.path.join(folder, SAFETENSORS)
  if os.path.isfile(path):
    try:
      state = safetensors.numpy.load_file(path)
    except Exception as e:  # pylint: disable=broad-except  # safetensors raises its own error types, and OSError
      raise ValueError(f"{path} cannot be read (damaged or truncated?): "
                       f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
  elif os.path.isfile(os.path.join(folder, TORCH_BIN)):
    state = torch_zip.load(os.path.join(folder, TORCH_BIN))
  else:
    raise ValueError(f"{folder} holds neither {SAFETENSORS} nor {TORCH_BIN}")
  return _renamed(state)


def _param_shapes(model: UNet, image_size: int, in_channels: int) -> Any:
  """The shapes and dtypes of the model's parameters for square images (nothing is computed)."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1, image_size, image_size, in_channels)))


def params_from_state_dict(model: UNet, state: Mapping[str, np.ndarray], image_size: int, in_channels: int) -> Any:
  """Our parameter tree from a diffusers UNet2DModel state dict; ValueError naming a missing, misshapen or unused
  weight."""
  levels = len(model.channel_mult)
  used: set[str] = set()

  def fill(path, leaf):
    names = tuple(k.key for k in path)
    keys = _torch_keys(names, levels)
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(f"the weights lack {missing[0]}, which the config's UNet2DModel has")
    used.update(keys)
    value = np.concatenate([_to_flax(np.asarray(state[k])) for k in keys], axis=-1)
    if value.shape != leaf.shape:
      raise ValueError(f"{keys[0]} has shape {tuple(np.shape(state[keys[0]]))}, which does not fit the config's "
                       f"UNet2DModel (its {'/'.join(names)} is {leaf.shape} in Flax's layout)")
    return np.asarray(value, leaf.dtype)

  params = jax.tree_util.tree_map_with_path(fill, _param_shapes(model, image_size, in_channels))
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"the weights hold {unused[0]}{f' and {len(unused) - 1} more' if len(unused) > 1 else ''}, "
                     "which the config's UNet2DModel does not have")
  return params


def read_unet(path: str) -> tuple[UNet, Any, UNetSpec]:
  """from_diffusers, with what the folder's config says in ddpm_jax's terms."""
  folder = unet_folder(path)
  spec = unet_spec(read_json(os.path.join(folder, UNET_CONFIG)), os.path.join(folder, UNET_CONFIG))
  model = unet_preset(BASE_PRESET, **spec.fields)
  return model, params_from_state_dict(model, read_state_dict(folder), spec.image_size, spec.in_channels), spec


def from_diffusers(path: str) -> tuple[UNet, Any]:
  """Our UNet and its parameters from a diffusers UNet2DModel folder or a pipeline folder (its unet/)."""
  return read_unet(path)[:2]


def has_scheduler(path: str) -> bool:
  """Whether a diffusers folder holds a scheduler config (a pipeline's, or its own)."""
  return any(os.path.isfile(p) for p in _scheduler_candidates(path))


def _scheduler_candidates(path: str) -> tuple[str, str]:
  """Where a pipeline folder, or a scheduler folder, keeps its scheduler config."""
  return os.path.join(path, "scheduler", SCHEDULER_CONFIG), os.path.join(path, SCHEDULER_CONFIG)


def scheduler_config_path(path: str) -> str:
  """The scheduler config of a pipeline folder, or of a scheduler folder."""
  for candidate in _scheduler_candidates(path):
    if os.path.isfile(candidate):
      return candidate
  raise ValueError(f"{path} has no scheduler/{SCHEDULER_CONFIG} (a pipeline) nor {SCHEDULER_CONFIG}")


def diffusion_settings(path: str) -> dict[str, Any]:
  """Our config's diffusion and sampler settings (dotted keys) from a diffusers DDPM or DDIM scheduler config;
  ValueError naming the field for anything ddpm_jax cannot express."""
  where = scheduler_config_path(path)
  config = read_json(where)
  c = {**SCHEDULER_DEFAULTS, **config}

  def refuse(key: str, allowed: str) -> ValueError:
    return ValueError(f"{where}: {key}={c[key]!r} cannot be expressed by ddpm_jax: {allowed}")

  if c.get("_class_name") not in SCHEDULERS:
    raise refuse("_class_name", f"allowed: {', '.join(SCHEDULERS)}")
  for key, allowed in (("beta_schedule", tuple(BETA_SCHEDULES)), ("prediction_type", tuple(PREDICTIONS)),
                       ("variance_type", tuple(VARIANCES)), ("timestep_spacing", SPACINGS),
                       ("trained_betas", (None,)), ("thresholding", (False,)), ("clip_sample_range", (1.0,)),
                       ("steps_offset", (0,)), ("rescale_betas_zero_snr", (False,))):
    if c[key] not in allowed:
      raise refuse(key, f"allowed: {', '.join(map(repr, allowed))}")
  return {"diffusion.schedule": BETA_SCHEDULES[c["beta_schedule"]],
          "diffusion.num_timesteps": c["num_train_timesteps"], "diffusion.beta_start": float(c["beta_start"]),
          "diffusion.beta_end": float(c["beta_end"]), "diffusion.prediction": PREDICTIONS[c["prediction_type"]],
          "sample.variance": VARIANCES[c["variance_type"]], "sample.clip_x0": bool(c["clip_sample"]),
          "sample.timestep_spacing": c["timestep_spacing"]}


def schedule_from_diffusers(path: str) -> Schedule:
  """The Schedule of a diffusers pipeline folder's scheduler (or of a scheduler folder)."""
  s = diffusion_settings(path)
  return make_schedule(s["diffusion.schedule"], s["diffusion.num_timesteps"], s["diffusion.beta_start"],
                       s["diffusion.beta_end"])


def scheduler_config(config: Mapping[str, Any]) -> dict:
  """The diffusers DDPMScheduler config of a run config's diffusion schedule, prediction target and DDPM sampler
  settings; ValueError for a schedule diffusers has no name for."""
  d, s = config["diffusion"], config["sample"]
  names = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
  if d["schedule"] not in names:
    raise ValueError(f"diffusion.schedule={d['schedule']!r} has no diffusers equivalent: diffusers' schedules are "
                     f"ddpm_jax's {', '.join(names)}")
  return {**SCHEDULER_DEFAULTS, "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
          "num_train_timesteps": d["num_timesteps"], "beta_start": d["beta_start"], "beta_end": d["beta_end"],
          "beta_schedule": names[d["schedule"]],
          "prediction_type": {ours: theirs for theirs, ours in PREDICTIONS.items()}[d.get("prediction", "eps")],
          "variance_type": s["variance"], "clip_sample": s["clip_x0"],
          "timestep_spacing": s.get("timestep_spacing", "leading")}


def _write_json(path: str, value: dict) -> None:
  """A JSON file, sorted and indented as diffusers writes its configs."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def to_diffusers(model: UNet, params: Any, path: str, schedule: Optional[Mapping[str, Any]] = None, *,
                 image_size: Optional[int] = None) -> None:
  """Writes a folder diffusers' UNet2DModel.from_pretrained loads or, with `schedule` (a run config: its
  image_size, diffusion and sample sections), one DDPMPipeline.from_pretrained loads.

  `image_size` (default the config's) places attention at the right levels.
  ValueError for a model diffusers' blocks cannot express, naming the field.
  """
  image_size = image_size or (schedule["image_size"] if schedule is not None else None)
  if image_size is None:
    raise ValueError("to_diffusers needs the image size (image_size=, or a run config as schedule=): it places "
                     "diffusers' attention blocks")
  in_channels = int(np.shape(params["stem"]["kernel"])[2])
  config = unet_config(model, image_size, in_channels)
  wanted = _param_shapes(model, image_size, in_channels)
  if jax.tree_util.tree_structure(wanted) != jax.tree_util.tree_structure(params) or any(
      np.shape(p) != w.shape for p, w in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(wanted))):
    raise ValueError("the parameters are not those of this UNet (their names or shapes differ)")
  levels = len(model.channel_mult)
  state = {}
  for key_path, value in jax.tree_util.tree_leaves_with_path(params):
    keys = _torch_keys(tuple(k.key for k in key_path), levels)
    for key, part in zip(keys, np.split(np.asarray(value, np.float32), len(keys), axis=-1)):
      state[key] = np.ascontiguousarray(_to_torch(part))
  scheduler = scheduler_config(schedule) if schedule is not None else None
  folder = os.path.join(path, "unet") if scheduler else path
  os.makedirs(folder, exist_ok=True)
  _write_json(os.path.join(folder, UNET_CONFIG), config)
  safetensors.numpy.save_file(state, os.path.join(folder, SAFETENSORS), metadata={"format": "pt"})
  if scheduler:
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    _write_json(os.path.join(path, "scheduler", SCHEDULER_CONFIG), scheduler)
    _write_json(os.path.join(path, PIPELINE_INDEX), {"_class_name": "DDPMPipeline",
                                                     "_diffusers_version": DIFFUSERS_VERSION,
                                                     "scheduler": ["diffusers", "DDPMScheduler"],
                                                     "unet": ["diffusers", "UNet2DModel"]})
