"""The accelerator-precision simulation (pytest --precision-sim) rounds what the devices round, and nothing else."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import python_path

HERE = os.path.dirname(os.path.abspath(__file__))


def round_mantissa(x, bits):
  """float32 values rounded to `bits` mantissa bits, to nearest with ties to even, by integer arithmetic."""
  u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  drop = 23 - bits
  u = (u + (1 << (drop - 1)) - 1 + ((u >> drop) & 1)) >> drop << drop
  return u.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("simulated, bits", [("tf32", 10), ("bf16", 7)])
def test_default_precision_dots_and_convolutions_round_their_operands_as_the_devices_do(simulated, bits):
  code = textwrap.dedent(f"""
      import json, sys
      import jax, jax.numpy as jnp, numpy as np
      from jax import lax
      import precision_sim
      precision_sim.install({simulated!r})
      rng = np.random.default_rng(0)
      a, b = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(48, 32)).astype(np.float32)
      x, k = rng.normal(size=(2, 6, 6, 8)).astype(np.float32), rng.normal(size=(3, 3, 8, 4)).astype(np.float32)
      conv = lambda x, k, p=None: lax.conv_general_dilated(x, k, (1, 1), "VALID", precision=p,
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      out = {{"dot": jax.jit(jnp.dot)(a, b), "eager": jnp.dot(a, b), "conv": conv(x, k),
             "highest": jnp.dot(a, b, precision="highest"), "conv_highest": conv(x, k, "highest")}}
      with jax.default_matmul_precision("float32"):
        out["pinned"] = jax.jit(lambda a, b: a @ b)(a, b)
      out["bf16_operands"] = jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
      json.dump({{k: np.asarray(v, np.float64).tolist() for k, v in out.items()}}, sys.stdout)
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path(HERE))
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  got = {k: np.asarray(v) for k, v in json.loads(res.stdout).items()}
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(48, 32)).astype(np.float32)
  x, k = rng.normal(size=(2, 6, 6, 8)).astype(np.float32), rng.normal(size=(3, 3, 8, 4)).astype(np.float32)

  def conv(x, k):
    patches = np.stack([x[:, i:i + 4, j:j + 4] for i in range(3) for j in range(3)], 3)  # [n, 4, 4, 9, 8]
    return np.einsum("nhwpc,pco->nhwo", patches, k.reshape(9, 8, 4))

  exact = a.astype(np.float64) @ b.astype(np.float64)
  rounded = round_mantissa(a, bits).astype(np.float64) @ round_mantissa(b, bits).astype(np.float64)
  # float32 accumulation of 48 products of magnitude ~1: error ~ 48 · 2^-24 ≈ 3e-6, far below the operand
  # rounding's effect (~ sqrt(48) · 2^-(bits+1) ≈ 3e-3 for TF32, 3e-2 for bf16).
  accumulation = 48 * 2.0 ** -24 * np.abs(a).max() * np.abs(b).max()
  for name in ("dot", "eager"):
    np.testing.assert_allclose(got[name], rounded, rtol=0, atol=accumulation, err_msg=name)
  assert np.abs(got["dot"] - exact).max() > 100 * accumulation  # the rounding did happen
  conv_rounded = conv(round_mantissa(x, bits).astype(np.float64), round_mantissa(k, bits).astype(np.float64))
  np.testing.assert_allclose(got["conv"], conv_rounded, rtol=0, atol=72 * 2.0 ** -24 * 16)
  # Precision HIGHEST, asked for per call or for a scope, stays float32; so do operands already in bf16.
  for name in ("highest", "pinned"):
    np.testing.assert_allclose(got[name], exact, rtol=0, atol=accumulation, err_msg=name)
  np.testing.assert_allclose(got["conv_highest"], conv(x.astype(np.float64), k.astype(np.float64)), rtol=0,
                             atol=72 * 2.0 ** -24 * 16)
  bf16 = round_mantissa(a, 7).astype(np.float64) @ round_mantissa(b, 7).astype(np.float64)
  np.testing.assert_allclose(got["bf16_operands"], bf16, rtol=0, atol=accumulation)


def test_round_mantissa_rounds_to_nearest_even():
  # 1 + 2^-11 lies half way between the TF32 neighbours 1 and 1 + 2^-10: ties go to the even one, 1.
  # 1 + 3 · 2^-11 lies half way between 1 + 2^-10 and 1 + 2^-9: ties go to the even one, 1 + 2^-9.
  x = np.array([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20, -(1 + 2.0 ** -11 + 2.0 ** -20)])
  np.testing.assert_array_equal(round_mantissa(x, 10), [1, 1 + 2.0 ** -9, 1 + 2.0 ** -10, -(1 + 2.0 ** -10)])
