"""Accelerator precision on the CPU (pytest --precision-sim): the float32 operands of every dot_general and
conv_general_dilated at default precision are rounded to TF32's 10 or bfloat16's 7 mantissa bits, as NVIDIA GPUs
from Ampere on (TF32) and TPUs (one bf16 pass) do at that precision; the products still accumulate in float32.

Precision HIGHEST (`jax.default_matmul_precision("float32")`, `precision="highest"`) is left exact, as it is on
the devices. The rounding is put into the lowering for the CPU, so every program compiled after `install` has it.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax import lax
from jax._src.interpreters import mlir  # pylint: disable=g-importing-member  (lowering rules have no public API)
from jax._src.lax import convolution
from jax._src.lib.mlir.dialects import hlo

MANTISSA_BITS = {"tf32": 10, "bf16": 7}  # float32 has 23
FLOAT32_BITS = 23
# Mantissa bits of a float32 operand at default precision on each backend (GPUs: TF32 from Ampere on; TPUs: one
# bf16 pass), and under each jax_default_matmul_precision setting.
BACKEND_BITS = {"cpu": FLOAT32_BITS, "gpu": 10, "cuda": 10, "tpu": 7}
SETTING_BITS = {"float32": FLOAT32_BITS, "highest": FLOAT32_BITS, "tensorfloat32": 10, "high": 10, "bfloat16": 7,
                "default": None, None: None}
_mode: Optional[str] = None


def mode() -> Optional[str]:
  """The simulated precision ('tf32', 'bf16') or None (exact float32 matmuls and convolutions)."""
  return _mode


def unit_roundoff() -> float:
  """The relative rounding error 2^-(bits + 1) of a float32 operand of a matmul or convolution at the precision in
  force: jax_default_matmul_precision when it says, else the simulated one, else the backend's default."""
  bits = SETTING_BITS.get(jax.config.jax_default_matmul_precision)
  if bits is None:
    bits = MANTISSA_BITS[_mode] if _mode else BACKEND_BITS.get(jax.default_backend(), FLOAT32_BITS)
  return 2.0 ** -(bits + 1)


def _is_default(precision) -> bool:
  """Whether a dot / conv precision parameter means the platform's default (None or DEFAULT for both operands)."""
  return precision is None or (isinstance(precision, tuple) and all(p == lax.Precision.DEFAULT for p in precision))


def _rounding(rule, mantissa_bits: int):
  """A lowering rule that rounds float32 operands at default precision to `mantissa_bits`, then lowers with `rule`."""

  def lower(ctx, lhs, rhs, *, precision, **params):
    if _is_default(precision):
      lhs, rhs = (hlo.reduce_precision(x, mlir.i32_attr(8), mlir.i32_attr(mantissa_bits))
                  if aval.dtype == np.float32 else x for x, aval in zip((lhs, rhs), ctx.avals_in))
    return rule(ctx, lhs, rhs, precision=precision, **params)
  return lower


def install(simulated: str) -> None:
  """Makes every CPU lowering of dot_general and conv_general_dilated from now on simulate `simulated` precision."""
  global _mode
  if simulated not in MANTISSA_BITS:
    raise ValueError(f"--precision-sim={simulated!r} is unknown: choose one of {', '.join(MANTISSA_BITS)}")
  if _mode is not None:
    raise RuntimeError(f"precision simulation {_mode!r} is already installed")
  for prim in (lax.dot_general_p, convolution.conv_general_dilated_p):
    entry = mlir._platform_specific_lowerings["cpu"].get(prim) or mlir._lowerings[prim]  # pylint: disable=protected-access
    mlir.register_lowering(prim, _rounding(entry.rule, MANTISSA_BITS[simulated]), platform="cpu", inline=entry.inline)
  _mode = simulated
