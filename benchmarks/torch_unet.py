"""The PyTorch peer: the same attention U-Net as ddpm_jax.unet (both topologies), written for the benchmark.

Built from docs/architecture.md's description of the two reference models and the fields
of ddpm_jax's presets; bench.py checks its parameter count and its forward
FLOPs against the JAX model's before timing anything.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """[B] timesteps -> [B, dim] features [sin(t f_i), cos(t f_i)], f_i = exp(-ln(max_period) i / (dim/2 - 1))."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
  """Two 3x3 convolutions with GroupNorm, SiLU and a time-embedding shift, plus a shortcut."""

  def __init__(self, cin: int, cout: int, temb: int, groups: int, order: str, dropout: float):
    super().__init__()
    self.order = order
    self.norm1 = nn.GroupNorm(groups, cin if order == "pre" else cout)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.temb = nn.Linear(temb, cout)
    self.norm2 = nn.GroupNorm(groups, cout)
    self.drop = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    shift = self.temb(F.silu(temb))[:, :, None, None]
    if self.order == "pre":
      h = self.conv1(F.silu(self.norm1(x))) + shift
      h = self.conv2(self.drop(F.silu(self.norm2(h))))
    else:
      h = F.silu(self.norm1(self.conv1(x))) + shift
      h = F.silu(self.norm2(self.conv2(self.drop(h))))
    return self.skip(x) + h


class Attention(nn.Module):
  """Pre-norm multi-head self-attention over all pixels with a residual add."""

  def __init__(self, c: int, heads: int, head_dim: int | None, norm: str, qkv_bias: bool, groups: int):
    super().__init__()
    self.heads, self.hd = heads, head_dim or c // heads
    self.norm = nn.GroupNorm(groups, c) if norm == "group" else nn.LayerNorm(c, bias=False)
    self.is_layer_norm = norm != "group"
    self.qkv = nn.Linear(c, 3 * heads * self.hd, bias=qkv_bias)
    self.out = nn.Linear(heads * self.hd, c)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    if self.is_layer_norm:
      h = self.norm(x.flatten(2).transpose(1, 2))
    else:
      h = self.norm(x).flatten(2).transpose(1, 2)
    q, k, v = self.qkv(h).reshape(b, hh * ww, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, self.heads * self.hd)
    return x + self.out(o).transpose(1, 2).reshape(b, c, hh, ww)


class UNet(nn.Module):
  """ε(x_t, t) for NCHW images: the DDPM paper's topology or the book's, from ddpm_jax preset fields."""

  def __init__(self, cfg: dict[str, Any], in_channels: int, image_size: int):
    super().__init__()
    c = cfg
    self.cfg, self.ch = c, c["base_channels"]
    widths = [self.ch * m for m in c["channel_mult"]]
    temb = 4 * self.ch
    self.temb0, self.temb1 = nn.Linear(self.ch, temb), nn.Linear(temb, temb)
    res = lambda i, o: ResBlock(i, o, temb, c["norm_groups"], c["block_order"], c["dropout"])
    attn = lambda w: Attention(w, c["num_heads"], c["head_dim"], c["attn_norm"], c["attn_qkv_bias"], c["norm_groups"])
    up_attn_res = c["up_attn_resolutions"] if c["up_attn_resolutions"] is not None else c["attn_resolutions"]
    self.stem = nn.Conv2d(in_channels, self.ch, 3, padding=1)
    self.ops = nn.ModuleList()  # (kind, module) in execution order; kinds drive forward()
    self.kinds: list[str] = []

    def add(kind: str, module: nn.Module) -> None:
      self.kinds.append(kind)
      self.ops.append(module)

    ddpm = c["topology"] == "ddpm"
    size, w, skip_widths = image_size, self.ch, [self.ch] if ddpm else []
    for level, width in enumerate(widths):
      for block in range(c["num_res_blocks"]):
        add("res", res(w, width))
        w = width
        if size in c["attn_resolutions"] and (c["attn_every_block"] or block == c["num_res_blocks"] - 1):
          add("attn", attn(w))
        add("push", nn.Identity())
        skip_widths.append(w)
      if level != len(widths) - 1:
        out = w if ddpm else widths[level + 1]
        down = (nn.Conv2d(w, out, 3, stride=2, padding=1) if c["downsample"] == "conv"
                else nn.Conv2d(4 * w, out, 1))
        add("down", down)
        w, size = out, size // 2
        if ddpm:
          add("push", nn.Identity())
          skip_widths.append(w)
      elif not ddpm:
        add("conv", nn.Conv2d(w, 2 * width, 3, padding=1))
        w = 2 * width
    mid = w
    add("res", res(w, mid))
    add("attn", attn(mid))
    add("res", res(mid, mid))
    for level in reversed(range(len(widths))):
      width = widths[level] * (1 if ddpm else 2)
      blocks = c["num_res_blocks"] + (1 if ddpm else 0)
      for block in range(blocks):
        add("res_pop", res(w + skip_widths.pop(), width))
        w = width
        last = c["num_res_blocks"] - (0 if ddpm else 1)
        if size in up_attn_res and (c["attn_every_block"] or block == last):
          add("attn", attn(w))
      if level != 0:
        out = w if ddpm else 2 * widths[level - 1]
        add("up", nn.Conv2d(w, out, 3, padding=1))
        w, size = out, size * 2
      elif not ddpm:
        add("conv", nn.Conv2d(w, self.ch, 3, padding=1))
        w = self.ch
    if ddpm:
      self.head_norm = nn.GroupNorm(c["norm_groups"], w)
      self.head = nn.Conv2d(w, in_channels, 3, padding=1)
    else:
      self.head_res = res(w + self.ch, self.ch)
      self.head = nn.Conv2d(self.ch, in_channels, 1)

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    temb = self.temb1(F.silu(self.temb0(timestep_embedding(t, self.ch))))
    if self.cfg["double_temb_silu"]:
      temb = F.silu(temb)
    ddpm = self.cfg["topology"] == "ddpm"
    h = r = self.stem(x)
    skips = [h] if ddpm else []
    for kind, op in zip(self.kinds, self.ops):
      if kind == "res":
        h = op(h, temb)
      elif kind == "res_pop":
        h = op(torch.cat([h, skips.pop()], dim=1), temb)
      elif kind == "attn" or kind == "conv":
        h = op(h)
      elif kind == "push":
        skips.append(h)
      elif kind == "down":
        h = op(h if self.cfg["downsample"] == "conv" else F.pixel_unshuffle(h, 2))
      elif kind == "up":
        h = op(F.interpolate(h, scale_factor=2, mode="nearest"))
    if ddpm:
      return self.head(F.silu(self.head_norm(h)))
    return self.head(self.head_res(torch.cat([h, r], dim=1), temb))


def count_params(model: nn.Module) -> int:
  """Total number of trainable scalars."""
  return sum(p.numel() for p in model.parameters())
