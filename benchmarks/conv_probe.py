"""One 3x3 convolution's forward, input gradient and weight gradient: XLA's, matmul reformulations, and PyTorch's.

  python benchmarks/conv_probe.py --batch 16 --size 32 --channels 128 --precision fp32

The measurements behind BENCHMARKS.md's convolution table and docs/perf-log.md's speed attempts (medians over
--repeats, milliseconds). Each reformulation is checked against lax.conv's
own result before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

DN = ("NHWC", "HWIO", "NHWC")
F32 = dict(preferred_element_type=jnp.float32)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of fn() in ms after one warm-up call (fn must block)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def conv(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """3x3, stride 1, padding 1, by XLA."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def patches(x: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, C] -> [B·H·W, 9·C], the 3x3 neighbourhoods (im2col)."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1).reshape(-1, 9 * c)


def variants(x_shape: tuple[int, ...]) -> dict[str, dict[str, Callable]]:
  """name -> {'forward' | 'input grad' | 'weight grad': f(x, w, g)} for each formulation."""
  b, h, w_, c = x_shape
  xla_dx = lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
  xla_dw = lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

  def col2im_dx(x, w, g):
    cols = jnp.dot(g.reshape(-1, c), w.reshape(9 * c, c).T, **F32).reshape(b, h, w_, 9, c)
    out = jnp.zeros((b, h + 2, w_ + 2, c), jnp.float32)
    for k in range(9):
      out = out.at[:, k // 3:k // 3 + h, k % 3:k % 3 + w_].add(cols[:, :, :, k])
    return out[:, 1:-1, 1:-1].astype(x.dtype)

  def shifted_dw(x, w, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w_], g, **F32)
                      for i in range(3) for j in range(3)]).reshape(w.shape).astype(w.dtype)

  def forward_conv_dw(x, w, g):  # the weight gradient as a forward convolution: batch contracted as channels
    out = jax.lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), (1, 1),
                                       ((1, 1), (1, 1)), dimension_numbers=DN, **F32)
    return jnp.transpose(out, (1, 2, 0, 3)).astype(w.dtype)

  return {
      "XLA conv": {"forward": lambda x, w, g: conv(x, w), "input grad": xla_dx, "weight grad": xla_dw},
      "im2col + matmul": {
          "forward": lambda x, w, g: jnp.dot(patches(x), w.reshape(9 * c, c), **F32).reshape(x.shape).astype(x.dtype),
          "input grad": col2im_dx,
          "weight grad": lambda x, w, g: jnp.dot(patches(x).T, g.reshape(-1, c), **F32).reshape(w.shape).astype(
              w.dtype)},
      "9 shifted matmuls": {"weight grad": shifted_dw},
      "dW as a forward conv": {"weight grad": forward_conv_dw},
  }


def main(argv: list[str]) -> int:
  """Prints a Markdown table of forward / input-grad / weight-grad times."""
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--channels", type=int, default=128)
  p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)
  dtype = jnp.float32 if args.precision == "fp32" else jnp.bfloat16
  b, s, c = args.batch, args.size, args.channels
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, s, s, c)), dtype)
  w = jnp.asarray(rng.normal(size=(3, 3, c, c)) / np.sqrt(9 * c), dtype)
  g = jnp.asarray(rng.normal(size=(b, s, s, c)), dtype)
  flops = 2 * b * s * s * 9 * c * c
  print(f"3x3 conv, batch {b}, {s}x{s}, {c}->{c} channels, {args.precision}: {flops / 1e9:.2f} GFLOP per pass, "
        f"{jax.local_devices()[0].device_kind}")
  parts = ("forward", "input grad", "weight grad")
  table = {}
  reference = {part: np.asarray(f(x, w, g), np.float32) for part, f in variants(x.shape)["XLA conv"].items()}
  for name, fns in variants(x.shape).items():
    row = {}
    for part, f in fns.items():
      f = jax.jit(f)
      got = np.asarray(f(x, w, g), np.float32)
      err = np.abs(got - reference[part]).max() / np.abs(reference[part]).max()
      if err > (1e-5 if dtype == jnp.float32 else 2e-2):
        raise AssertionError(f"{name} {part} differs from lax.conv by {err:.2e} (relative to its largest entry)")
      row[part] = median_ms(lambda f=f: f(x, w, g).block_until_ready(), args.repeats)
    table[f"JAX {name}"] = row
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  if torch is not None:
    tdtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    to_torch = lambda a, perm: torch.from_numpy(np.array(a, np.float32)).permute(*perm).contiguous().to(tdtype)
    tx, tw, tg = to_torch(x, (0, 3, 1, 2)), to_torch(w, (3, 2, 0, 1)), to_torch(g, (0, 3, 1, 2))
    tx.requires_grad_()
    tw.requires_grad_()
    tconv = lambda: torch.nn.functional.conv2d(tx, tw, padding=1)

    def t_fwd():
      with torch.no_grad():
        tconv()

    grad_of = lambda which: lambda: torch.autograd.grad(tconv(), [which], tg)
    fwd = median_ms(t_fwd, args.repeats)
    table[f"PyTorch {torch.__version__}"] = {"forward": fwd, "input grad": median_ms(grad_of(tx), args.repeats) - fwd,
                                             "weight grad": median_ms(grad_of(tw), args.repeats) - fwd}
  print("| implementation | " + " | ".join(f"{p} ms" for p in parts) + " |")
  print("| --- |" + " --- |" * len(parts))
  for name, row in table.items():
    print(f"| {name} | " + " | ".join(f"{row[p]:.1f}" if p in row else "-" for p in parts) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
