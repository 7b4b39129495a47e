"""A Flax linen attention U-Net that predicts the noise in x_t, with the book's and the DDPM paper's presets."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax.labels import NO_LABEL

Dtype = Any

TOPOLOGIES = ("ddpm", "book")
BLOCK_ORDERS = ("pre", "post")
ATTN_NORMS = ("group", "layer")
DOWNSAMPLES = ("conv", "space_to_depth")
INIT_SCHEMES = ("flax", "ddpm")
ATTENTIONS = ("auto", "xla", "cudnn")  # how attention is computed: the same function and parameters either way
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # the compute dtypes cuDNN's fused attention takes


def initializers(scheme: str) -> tuple[Any, Any]:
  """(default kernel initializer, initializer of the layers that end a residual branch) of an init scheme.

  "flax": Flax's defaults (LeCun normal) everywhere. "ddpm": the DDPM
  reference's fan-average uniform variance scaling (scale 1), with zeros for
  the second conv of each residual block, the attention output projection and
  the final conv, so that every block starts as the identity.
  """
  if scheme == "ddpm":
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), nn.initializers.zeros
  default = nn.linear.default_kernel_init
  return default, default


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0) -> jnp.ndarray:
  """[B] timesteps -> [B, dim] features [sin(t f_i), cos(t f_i)] ([cos, sin] when flipped),
  f_i = exp(-ln(max_period) i / (dim/2 - freq_shift))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  return jnp.concatenate(parts, axis=-1)


def space_to_depth(x: jnp.ndarray, block: int = 2) -> jnp.ndarray:
  """[B, H, W, C] -> [B, H/b, W/b, b*b*C], each b x b patch stacked on channels."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


def upsample_nearest(x: jnp.ndarray, factor: int = 2) -> jnp.ndarray:
  """Nearest-neighbour upsampling by an integer factor, as a broadcast."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


class ResBlock(nn.Module):
  """Two 3x3 convolutions with GroupNorm, SiLU and a time-embedding shift, plus a shortcut."""

  out_ch: int
  groups: int
  order: str = "pre"
  dropout: float = 0.0
  init_scheme: str = "flax"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, train: bool) -> jnp.ndarray:
    kernel, last = initializers(self.init_scheme)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(nn.Conv, self.out_ch, (3, 3), **kw)
    norm = functools.partial(nn.GroupNorm, num_groups=self.groups, epsilon=self.norm_eps, **kw)
    shift = nn.Dense(self.out_ch, kernel_init=kernel, **kw)(nn.silu(temb))[:, None, None, :]
    drop = nn.Dropout(self.dropout, deterministic=not train)
    if self.order == "pre":  # DDPM: norm -> act -> conv
      h = conv(kernel_init=kernel)(nn.silu(norm()(x))) + shift
      h = conv(kernel_init=last)(drop(nn.silu(norm()(h))))
    else:  # the book: conv -> norm -> act
      h = nn.silu(norm()(conv(kernel_init=kernel)(x))) + shift
      h = nn.silu(norm()(conv(kernel_init=last)(drop(h))))
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), kernel_init=kernel, **kw)(x)
    return x + h


def cudnn_attention_runs(dtype: Any) -> bool:
  """Whether cuDNN's fused attention can run here in compute `dtype`: on a GPU, in bfloat16 or float16."""
  return jax.default_backend() == "gpu" and jnp.dtype(dtype) in FUSED_DTYPES


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, attention: str) -> jnp.ndarray:
  """softmax(q k^T / sqrt(d)) v over [B, L, heads, d]: `xla` materialises the B x heads x L x L scores, `cudnn` runs
  cuDNN's fused kernel, `auto` the fused kernel on a GPU in bf16 or fp16 where cuDNN takes the shapes, else XLA's."""
  if attention != "auto":
    return jax.nn.dot_product_attention(q, k, v, implementation=attention)
  if cudnn_attention_runs(q.dtype):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError) as e:  # cuDNN absent, or a head size or GPU it cannot take
      logging.warning("attention over %s in %s takes XLA's kernel (the scores in memory), not cuDNN's: %s", q.shape,
                      q.dtype, e)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


class AttentionBlock(nn.Module):
  """Pre-norm multi-head self-attention over all pixels with a residual add."""

  num_heads: int = 1
  head_dim: Optional[int] = None  # None: channels // num_heads
  norm: str = "group"
  qkv_bias: bool = True
  groups: int = 32
  init_scheme: str = "flax"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_eps: float = 1e-6
  attention: str = "auto"  # see attend()

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel, last = initializers(self.init_scheme)
    b, hh, ww, c = x.shape
    hd = self.head_dim or c // self.num_heads
    if self.norm == "group":
      h = nn.GroupNorm(num_groups=self.groups, epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    else:
      h = nn.LayerNorm(use_bias=False, epsilon=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    qkv = nn.Dense(3 * self.num_heads * hd, use_bias=self.qkv_bias, kernel_init=kernel, dtype=self.dtype,
                   param_dtype=self.param_dtype)(h.reshape(b, hh * ww, c))
    q, k, v = jnp.split(qkv.reshape(b, hh * ww, 3, self.num_heads, hd), 3, axis=2)
    out = attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attention)
    out = nn.Dense(c, kernel_init=last, dtype=self.dtype, param_dtype=self.param_dtype)(
        out.reshape(b, hh * ww, self.num_heads * hd))
    return x + out.reshape(b, hh, ww, c)


class UNet(nn.Module):
  """Predicts ε from (x_t, t) and, when `num_classes` > 0, class labels: NHWC in, same shape out.

  `topology="ddpm"` is the DDPM paper's U-Net: every encoder activation (stem,
  residual blocks, downsamplings) is a skip, decoder levels have
  `num_res_blocks + 1` blocks at the encoder's widths, and a GroupNorm-SiLU-conv
  head. `topology="book"` is the book's: skips after each residual block only,
  the stem kept as a global skip for a final residual block, a middle and
  decoder at twice the encoder's widths. `attn_resolutions` are feature-map
  heights that get attention in the encoder (and `up_attn_resolutions`, default
  the same, in the decoder); the middle always has one. With `learn_variance`
  the output has twice the channels: the prediction, then the v of Nichol &
  Dhariwal's learned variance (ddpm_jax.diffusion.model_log_variance).
  """

  base_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  up_attn_resolutions: Optional[Sequence[int]] = None
  attn_every_block: bool = True  # False: attention only after a level's last block
  num_heads: int = 1
  head_dim: Optional[int] = None
  attn_norm: str = "group"
  attn_qkv_bias: bool = True
  dropout: float = 0.0
  norm_groups: int = 32
  block_order: str = "pre"
  double_temb_silu: bool = False  # the book applies SiLU to the embedding twice
  downsample: str = "conv"
  downsample_padding: int = 0  # of the conv downsampling: 0, one row and column after (TF's SAME); 1, one each side
  norm_eps: float = 1e-6  # epsilon of every normalization
  flip_sin_to_cos: bool = False  # the time embedding as [cos, sin] instead of [sin, cos]
  freq_shift: float = 1.0  # time-embedding frequencies exp(-ln(10^4) i / (dim/2 - freq_shift))
  topology: str = "ddpm"
  init_scheme: str = "flax"  # "ddpm": the DDPM reference's initialisation (see initializers())
  out_channels: Optional[int] = None  # None: as many as the input
  learn_variance: bool = False  # True: twice the output channels, the prediction then v of a learned variance
  num_classes: int = 0  # > 0: class-conditional, an embedding of num_classes + 1 rows (the last: no label)
  attention: str = "auto"  # auto | xla | cudnn: how attention is computed (see attend()); parameters the same
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def validate(self, input_shape: Sequence[int]) -> None:
    """Raises ValueError for settings, or an NHWC input shape, this network cannot take."""
    for field, value, allowed in (("topology", self.topology, TOPOLOGIES),
                                  ("block_order", self.block_order, BLOCK_ORDERS),
                                  ("attn_norm", self.attn_norm, ATTN_NORMS),
                                  ("downsample", self.downsample, DOWNSAMPLES),
                                  ("init_scheme", self.init_scheme, INIT_SCHEMES),
                                  ("attention", self.attention, ATTENTIONS)):
      if value not in allowed:
        raise ValueError(f"UNet {field}={value!r} is unknown: choose one of {', '.join(allowed)}")
    if not self.channel_mult or self.num_res_blocks < 1 or self.base_channels < 1:
      raise ValueError(f"UNet needs channel_mult non-empty, num_res_blocks >= 1 and base_channels >= 1, got "
                       f"{tuple(self.channel_mult)}, {self.num_res_blocks}, {self.base_channels}")
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
      raise ValueError(f"UNet num_classes={self.num_classes!r} is invalid: use 0 (unconditional) or a class count")
    if self.downsample_padding not in (0, 1):
      raise ValueError(f"UNet downsample_padding={self.downsample_padding!r} is unsupported: use 0 or 1")
    if not self.norm_eps > 0:
      raise ValueError(f"UNet norm_eps={self.norm_eps!r} is invalid: it must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"UNet dropout={self.dropout!r} is out of range: it must lie in [0, 1)")
    bad = [w for w in self._widths() if w % self.norm_groups]
    if bad:
      raise ValueError(f"UNet widths {bad} are not divisible by norm_groups={self.norm_groups}")
    shape = tuple(input_shape)
    if len(shape) != 4:
      raise ValueError(f"UNet input must be NHWC (4 dims), got shape {shape}")
    factor = 2 ** (len(self.channel_mult) - 1)
    if shape[1] % factor or shape[2] % factor:
      raise ValueError(f"image size {shape[1]}x{shape[2]} is not divisible by {factor}, "
                       f"which {len(self.channel_mult)} resolution levels need")

  def _head_channels(self, x: jnp.ndarray) -> int:
    """Output channels: out_channels (default: the input's), doubled with a learned variance."""
    return (self.out_channels or x.shape[-1]) * (2 if self.learn_variance else 1)

  def _widths(self) -> list[int]:
    """Every feature width the network uses."""
    enc = [self.base_channels * m for m in self.channel_mult]
    return enc + ([2 * w for w in enc] if self.topology == "book" else [])

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, *, labels: Optional[jnp.ndarray] = None,
               train: bool = False) -> jnp.ndarray:
    t = jnp.broadcast_to(jnp.asarray(t), x.shape[:1]) if jnp.ndim(t) == 0 else jnp.asarray(t)
    self.validate(x.shape)
    if t.shape != x.shape[:1]:
      raise ValueError(f"t must be a scalar or of shape [{x.shape[0]}] (the batch), got shape {t.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch = self.base_channels
    kernel, _ = initializers(self.init_scheme)
    temb = timestep_embedding(t, ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    temb = nn.Dense(4 * ch, kernel_init=kernel, name="temb_dense_0", **kw)(temb)
    temb = nn.Dense(4 * ch, kernel_init=kernel, name="temb_dense_1", **kw)(nn.silu(temb))
    if self.num_classes:
      temb = temb + nn.Embed(self.num_classes + 1, 4 * ch, name="label_embed", **kw)(self._label_rows(labels, x))
    elif labels is not None:
      raise ValueError("labels were given to an unconditional UNet (num_classes=0)")
    if self.double_temb_silu:
      temb = nn.silu(temb)
    res = lambda name, width, h: ResBlock(width, self.norm_groups, self.block_order, self.dropout, self.init_scheme,
                                          name=name, norm_eps=self.norm_eps, **kw)(h, temb, train)
    attn = lambda name, h: AttentionBlock(self.num_heads, self.head_dim, self.attn_norm, self.attn_qkv_bias,
                                          self.norm_groups, self.init_scheme, name=name, norm_eps=self.norm_eps,
                                          attention=self.attention, **kw)(h)
    body = self._ddpm_body if self.topology == "ddpm" else self._book_body
    h = body(x.astype(self.dtype), res, attn, kw)
    return h.astype(x.dtype)

  def _label_rows(self, labels: Optional[jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
    """Embedding rows of int labels [B]: the label, or the last row for NO_LABEL (and for None: every example)."""
    if labels is None:
      return jnp.full(x.shape[:1], self.num_classes, jnp.int32)
    if jnp.shape(labels) != x.shape[:1]:
      raise ValueError(f"labels must be of shape [{x.shape[0]}] (the batch), got shape {jnp.shape(labels)}")
    if not isinstance(labels, jax.core.Tracer):  # concrete labels are checked; traced ones (under jit) cannot be
      values = np.asarray(labels)
      bad = values[(values < NO_LABEL) | (values >= self.num_classes)]
      if bad.size:
        raise ValueError(f"label {int(bad[0])} is out of range: use 0..{self.num_classes - 1}, or {NO_LABEL} (no "
                         "label)")
    labels = jnp.asarray(labels)
    return jnp.where(labels == NO_LABEL, self.num_classes, labels).astype(jnp.int32)

  def _wants_attn(self, h: jnp.ndarray, block: int, up: bool) -> bool:
    """Whether attention follows residual block `block` of the level at h's resolution."""
    where = self.up_attn_resolutions if (up and self.up_attn_resolutions is not None) else self.attn_resolutions
    last = self.num_res_blocks - (0 if (up and self.topology == "ddpm") else 1)
    return h.shape[1] in where and (self.attn_every_block or block == last)

  def _down(self, name: str, h: jnp.ndarray, width: int, kw: dict) -> jnp.ndarray:
    """Halves the resolution, ending at `width` channels."""
    kernel, _ = initializers(self.init_scheme)
    if self.downsample == "conv":
      padding = ((1, 1), (1, 1)) if self.downsample_padding else "SAME"
      return nn.Conv(width, (3, 3), strides=(2, 2), padding=padding, kernel_init=kernel, name=name, **kw)(h)
    return nn.Conv(width, (1, 1), kernel_init=kernel, name=name, **kw)(space_to_depth(h))

  def _up(self, name: str, h: jnp.ndarray, width: int, kw: dict) -> jnp.ndarray:
    """Doubles the resolution (nearest neighbour), then a 3x3 conv to `width` channels."""
    return nn.Conv(width, (3, 3), kernel_init=initializers(self.init_scheme)[0], name=name, **kw)(upsample_nearest(h))

  def _level(self, h, level: int, width: int, blocks: int, skips: list, res, attn, up: bool):
    """One resolution level's residual blocks (each maybe followed by attention): the encoder pushes a skip
    after each, the decoder feeds each [h, popped skip]."""
    side = "up" if up else "down"
    for block in range(blocks):
      h = res(f"{side}_{level}_res_{block}", width, jnp.concatenate([h, skips.pop()], axis=-1) if up else h)
      if self._wants_attn(h, block, up):
        h = attn(f"{side}_{level}_attn_{block}", h)
      if not up:
        skips.append(h)
    return h

  def _ddpm_body(self, x, res, attn, kw):
    """The DDPM paper's encoder, middle, decoder and head."""
    widths = [self.base_channels * m for m in self.channel_mult]
    kernel, last = initializers(self.init_scheme)
    h = nn.Conv(self.base_channels, (3, 3), kernel_init=kernel, name="stem", **kw)(x)
    skips = [h]
    for level, width in enumerate(widths):
      h = self._level(h, level, width, self.num_res_blocks, skips, res, attn, up=False)
      if level != len(widths) - 1:
        h = self._down(f"down_{level}_downsample", h, h.shape[-1], kw)
        skips.append(h)
    h = res("mid_res_1", widths[-1], attn("mid_attn", res("mid_res_0", widths[-1], h)))
    for level in reversed(range(len(widths))):
      h = self._level(h, level, widths[level], self.num_res_blocks + 1, skips, res, attn, up=True)
      if level != 0:
        h = self._up(f"up_{level}_upsample", h, h.shape[-1], kw)
    h = nn.silu(nn.GroupNorm(num_groups=self.norm_groups, epsilon=self.norm_eps, name="head_norm", **kw)(h))
    return nn.Conv(self._head_channels(x), (3, 3), kernel_init=last, name="head_conv", **kw)(h)

  def _book_body(self, x, res, attn, kw):
    """The book's encoder, middle and decoder at twice the width, and global-skip head."""
    widths = [self.base_channels * m for m in self.channel_mult]
    kernel, last = initializers(self.init_scheme)
    r = h = nn.Conv(self.base_channels, (3, 3), kernel_init=kernel, name="stem", **kw)(x)
    skips = []
    for level, width in enumerate(widths):
      h = self._level(h, level, width, self.num_res_blocks, skips, res, attn, up=False)
      if level != len(widths) - 1:
        h = self._down(f"down_{level}_downsample", h, widths[level + 1], kw)
      else:
        h = nn.Conv(2 * width, (3, 3), kernel_init=kernel, name=f"down_{level}_widen", **kw)(h)
    h = res("mid_res_1", 2 * widths[-1], attn("mid_attn", res("mid_res_0", 2 * widths[-1], h)))
    for level in reversed(range(len(widths))):
      h = self._level(h, level, 2 * widths[level], self.num_res_blocks, skips, res, attn, up=True)
      if level != 0:
        h = self._up(f"up_{level}_upsample", h, 2 * widths[level - 1], kw)
      else:
        h = nn.Conv(self.base_channels, (3, 3), kernel_init=kernel, name=f"up_{level}_narrow", **kw)(h)
    h = res("head_res", self.base_channels, jnp.concatenate([h, r], axis=-1))
    return nn.Conv(self._head_channels(x), (1, 1), kernel_init=last, name="head_conv", **kw)(h)


PRESETS: dict[str, dict[str, Any]] = {
    # The DDPM paper's CIFAR-10 model (Ho et al. 2020): 35,746,307 parameters.
    "ddpm_cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                         dropout=0.1, norm_groups=32, num_heads=1, attn_norm="group", attn_qkv_bias=True,
                         block_order="pre", downsample="conv", topology="ddpm", init_scheme="ddpm"),
    # The book's 64x64 flowers model (Learn Generative AI with PyTorch, ch. 15): 133,417,219 parameters.
    "book64": dict(base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                   up_attn_resolutions=(64,), attn_every_block=False, num_heads=4, head_dim=32, attn_norm="layer",
                   attn_qkv_bias=False, dropout=0.0, norm_groups=8, block_order="post", double_temb_silu=True,
                   downsample="space_to_depth", topology="book"),
    # A CPU-sized DDPM-style model for tests and the offline default.
    "tiny": dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, norm_groups=8, num_heads=2, attn_norm="group", attn_qkv_bias=True,
                 block_order="pre", downsample="conv", topology="ddpm"),
}


def unet_preset(name: str, **overrides: Any) -> UNet:
  """A UNet from a named preset, with any field overridden (dtypes as dtypes or their names)."""
  if name not in PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}: choose one of {', '.join(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown UNet field(s) {', '.join(unknown)}: allowed are {', '.join(sorted(fields))}")
  for key in ("dtype", "param_dtype"):
    if isinstance(overrides.get(key), str):
      try:
        overrides[key] = jnp.dtype(overrides[key])
      except TypeError:
        raise ValueError(f"UNet {key}={overrides[key]!r} is not a dtype: use float32 or bfloat16") from None
  return UNet(**{**PRESETS[name], **overrides})


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
