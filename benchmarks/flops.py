"""Model FLOPs of a U-Net counted analytically, layer by layer, from the shapes each layer sees (nothing runs).

Counted: every convolution, every dense layer and the two attention matmuls (q k^T and weights @ v), 2 FLOPs per
multiply-add; their biases, 1 FLOP per output element; GroupNorm and LayerNorm, 5 FLOPs per element (subtract the
mean, square, the two sums, normalise) plus 1 each for the gain and the offset where present. Activations, residual
adds, the softmax and the optimizer are left out (under 1% of any preset's count at batch 16 or more). A training
step is the forward pass plus a backward pass of twice its FLOPs (each layer's gradient with respect to its input
and to its weights is one product as large as the forward one; for the attention matmuls, one per operand): 3x
forward.

Convolution taps that fall in the zero padding are left out by default, as XLA's cost analysis does;
`count_padding=True` counts them, as PyTorch's FLOP counter does.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.unet import AttentionBlock
from ddpm_jax.train_state import init_params

BACKWARD_FACTOR = 2  # backward FLOPs per forward FLOP


def _taps(size_in: int, size_out: int, kernel: int, stride: int, dilation: int, pad_low: int,
          count_padding: bool) -> int:
  """Kernel taps summed over the output positions of one spatial axis (only those inside the input unless
  count_padding)."""
  if count_padding:
    return size_out * kernel
  return sum(1 for o in range(size_out) for k in range(kernel) if 0 <= o * stride + k * dilation - pad_low < size_in)


def _pad_low(padding: Any, size_in: int, size_out: int, kernel: int, stride: int, dilation: int) -> int:
  """The zero padding before the first input position of one axis, for the paddings the presets use."""
  if padding == "VALID":
    return 0
  if padding == "SAME":
    return max((size_out - 1) * stride + (kernel - 1) * dilation + 1 - size_in, 0) // 2
  raise ValueError(f"conv padding {padding!r} is not counted: use 'SAME' or 'VALID'")


def conv_flops(conv: nn.Conv, x_shape: Sequence[int], y_shape: Sequence[int], count_padding: bool = False) -> int:
  """FLOPs of one nn.Conv call mapping NHWC x_shape to y_shape."""
  spatial = len(x_shape) - 2
  as_tuple = lambda v: (v,) * spatial if v is None or isinstance(v, int) else tuple(v)
  strides, dilations = as_tuple(conv.strides or 1), as_tuple(conv.kernel_dilation or 1)
  taps = 1
  for axis in range(spatial):
    size_in, size_out, k = x_shape[1 + axis], y_shape[1 + axis], conv.kernel_size[axis]
    low = _pad_low(conv.padding, size_in, size_out, k, strides[axis], dilations[axis])
    taps *= _taps(size_in, size_out, k, strides[axis], dilations[axis], low, count_padding)
  return 2 * x_shape[0] * taps * (x_shape[-1] // conv.feature_group_count) * y_shape[-1]


def dense_flops(x_shape: Sequence[int], features: int) -> int:
  """FLOPs of one nn.Dense call on x_shape (the last axis is contracted)."""
  return 2 * int(np.prod(x_shape)) * features


def norm_flops(norm: nn.Module, y_shape: Sequence[int]) -> int:
  """FLOPs of one nn.GroupNorm or nn.LayerNorm call with output y_shape."""
  return (5 + int(norm.use_scale) + int(norm.use_bias)) * int(np.prod(y_shape))


def attention_flops(block: AttentionBlock, x_shape: Sequence[int]) -> int:
  """FLOPs of the two matmuls of an AttentionBlock's attention over the h*w pixels of NHWC x_shape."""
  b, h, w, c = x_shape
  head_dim = block.head_dim or c // block.num_heads
  return 2 * 2 * b * block.num_heads * (h * w) ** 2 * head_dim


def forward_flops(model: nn.Module, input_shape: Sequence[int], count_padding: bool = False) -> int:
  """Forward FLOPs of `model(x, t)` for NHWC inputs of input_shape, summed over every layer it calls."""
  total = [0]

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__":
      if isinstance(module, nn.Conv):
        total[0] += conv_flops(module, args[0].shape, out.shape, count_padding) + module.use_bias * out.size
      elif isinstance(module, nn.Dense):
        total[0] += dense_flops(args[0].shape, module.features) + module.use_bias * out.size
      elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        total[0] += norm_flops(module, out.shape)
      elif isinstance(module, AttentionBlock):
        total[0] += attention_flops(module, args[0].shape)
    return out

  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct(tuple(input_shape[:1]), jnp.int32)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1,) + tuple(input_shape[1:])))
  with nn.intercept_methods(count):
    jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t), params, x, t)
  return total[0]


def train_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
  """FLOPs of one training step (forward and backward) on a batch of input_shape."""
  return (1 + BACKWARD_FACTOR) * forward_flops(model, input_shape)
