"""Config sections shared by the experiment files (plain data: nothing here imports ddpm_jax)."""

import ml_collections
from ml_collections.config_dict import placeholder


def model(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The model section: a ddpm_jax.unet preset and the fields that differ from it.

  Every field of the U-Net is listed so that any of them can be set on the
  command line (--config.model.base_channels=32); None keeps the preset's value.
  """
  m = ml_collections.ConfigDict()
  m.preset = preset  # tiny (CPU-sized), ddpm_cifar10 (the DDPM paper's, 35.7M), book64 (the book's, 133.4M)
  m.base_channels = placeholder(int)  # width of the first level
  m.channel_mult = placeholder(tuple)  # width of level i = base_channels * channel_mult[i]; len = resolution levels
  m.num_res_blocks = placeholder(int)  # residual blocks per encoder level (the DDPM decoder has one more)
  m.attn_resolutions = placeholder(tuple)  # feature-map sizes (heights) with attention in the encoder
  m.up_attn_resolutions = placeholder(tuple)  # the same for the decoder; None: as the encoder
  m.attn_every_block = placeholder(bool)  # False: attention only after a level's last block
  m.num_heads = placeholder(int)
  m.head_dim = placeholder(int)  # None: channels // num_heads
  m.attn_norm = placeholder(str)  # group | layer
  m.attn_qkv_bias = placeholder(bool)
  m.dropout = placeholder(float)  # in [0, 1)
  m.norm_groups = placeholder(int)  # GroupNorm groups; every width must divide by it
  m.block_order = placeholder(str)  # pre (norm-act-conv, DDPM) | post (conv-norm-act, the book)
  m.double_temb_silu = placeholder(bool)  # the book applies SiLU to the time embedding twice
  m.downsample = placeholder(str)  # conv (3x3 stride 2) | space_to_depth (2x2 to channels, then 1x1 conv)
  m.downsample_padding = placeholder(int)  # conv downsampling: 0 (one row/column after, TF's SAME) | 1 (each side)
  m.norm_eps = placeholder(float)  # epsilon of every normalization
  m.flip_sin_to_cos = placeholder(bool)  # the time embedding as [cos, sin] instead of [sin, cos]
  m.freq_shift = placeholder(float)  # time-embedding frequencies exp(-ln(10^4) i / (dim/2 - freq_shift))
  m.topology = placeholder(str)  # ddpm | book (see ddpm_jax.unet.UNet)
  m.init_scheme = placeholder(str)  # flax | ddpm (fan-average uniform, zero-initialised residual-branch ends)
  m.out_channels = placeholder(int)  # None: as many as the input
  m.learn_variance = placeholder(bool)  # True: twice the output channels, the second half a learned variance
  m.num_classes = placeholder(int)  # > 0: class-conditional on the dataset's labels (classifier-free guidance)
  m.dtype = placeholder(str)  # compute dtype: float32 | bfloat16
  m.attention = placeholder(str)  # auto (cuDNN's fused kernel on a GPU in bf16, else XLA's) | xla | cudnn
  m.param_dtype = placeholder(str)  # parameter dtype: float32 | bfloat16
  for key, value in overrides.items():
    m[key] = value
  return m


def wandb() -> ml_collections.ConfigDict:
  """The Weights & Biases section: off unless a project is named (needs `pip install wandb`; process 0 logs)."""
  w = ml_collections.ConfigDict()
  w.project = placeholder(str)
  return w


def evaluation() -> ml_collections.ConfigDict:
  """The eval section: what the evaluation hook computes besides sample quality (at eval_every_steps)."""
  e = ml_collections.ConfigDict()
  e.nll_num_images = 0  # > 0: the bound in bits/dim on this many evaluation images (test split where there is one)
  return e
