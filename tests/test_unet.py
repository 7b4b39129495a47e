"""The U-Net: shapes, the reference parameter counts, skips, time conditioning, bf16, dropout."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.train_state import INIT_COMPILER_OPTIONS, init_params
from ddpm_jax.unet import attend, count_params, unet_preset

TINY = unet_preset("tiny")
# A book-topology model small enough for the CPU: every book-specific block kind, 4x4 .. 16x16.
TINY_BOOK = unet_preset("book64", base_channels=16, attn_resolutions=(4,), up_attn_resolutions=(16,),
                        num_heads=2, head_dim=8)


def _shapes(model, shape):
  """The shapes and dtypes of the model's variables for NHWC inputs of `shape`, computed without running anything."""
  return {"params": jax.eval_shape(lambda key: init_params(model, key, shape), jax.random.key(0))}


def _init(model, shape, seed=0):
  """The model's variables for NHWC inputs of `shape` from key `seed`: the initialisers alone, compiled as
  create_train_state compiles them."""
  key = jax.random.key(seed)
  program = jax.jit(init_params, static_argnums=(0, 2)).lower(model, key, shape).compile(INIT_COMPILER_OPTIONS)
  return {"params": program(key)}


@pytest.fixture(scope="module")
def tiny_params():
  return _init(TINY, (1, 16, 16, 3))


@pytest.mark.parametrize("model", [TINY, TINY_BOOK], ids=["ddpm", "book"])
@pytest.mark.parametrize("shape, t", [((1, 8, 8, 1), 3), ((3, 16, 16, 3), [0.5, 10.0, 999.0]),
                                      ((2, 16, 8, 4), [7, 900])])
def test_output_shape_equals_input_shape(model, shape, t):
  params = _shapes(model, shape)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  out = jax.eval_shape(lambda p, x: model.apply(p, x, jnp.asarray(t)), params, x)
  assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.numerics
def test_tiny_forward_is_finite_and_jit_matches_eager(tiny_params):
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([3, 700])
  # Float32 matmuls and convolutions on every backend: TF32 / bf16 rounding of intermediates that jit and eager
  # compute a few float32 ulps apart would swamp the comparison.
  with jax.default_matmul_precision("float32"):
    eager = TINY.apply(tiny_params, x, t)
    jitted = jax.jit(TINY.apply)(tiny_params, x, t)
  assert np.isfinite(np.asarray(eager)).all()
  np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-5)
  assert count_params(tiny_params) < 300_000


@pytest.mark.parametrize("name, size, expected", [("book64", 64, 133_417_219), ("ddpm_cifar10", 32, 35_746_307)])
def test_reference_parameter_counts(name, size, expected):
  model = unet_preset(name)
  params = _shapes(model, (1, size, size, 3))
  assert count_params(params) == expected
  out = jax.eval_shape(lambda p: model.apply(p, jnp.zeros((2, size, size, 3)), jnp.zeros(2, jnp.int32)), params)
  assert out.shape == (2, size, size, 3)


def test_attention_placement_matches_the_references():
  book = _shapes(unet_preset("book64"), (1, 64, 64, 3))["params"]
  cifar = _shapes(unet_preset("ddpm_cifar10"), (1, 32, 32, 3))["params"]
  # The book: after the 2nd block at 16x16 going down, in the middle, after the 2nd block at 64x64 going up.
  assert sorted(k for k in book if "attn" in k) == ["down_2_attn_1", "mid_attn", "up_0_attn_1"]
  # The paper: after every block at 16x16 (level 1), both ways, and in the middle.
  assert sorted(k for k in cifar if "attn" in k) == ["down_1_attn_0", "down_1_attn_1", "mid_attn",
                                                   "up_1_attn_0", "up_1_attn_1", "up_1_attn_2"]
  # The book's attention: 4 heads x 32 (inner width 128) at every width, fused bias-free qkv, LN gain only.
  attn = book["down_2_attn_1"]
  assert attn["Dense_0"]["kernel"].shape == (512, 384) and "bias" not in attn["Dense_0"]
  assert set(attn["LayerNorm_0"]) == {"scale"}
  assert book["up_0_attn_1"]["Dense_0"]["kernel"].shape == (256, 384)


@pytest.mark.slow
@pytest.mark.parametrize("model", [TINY, TINY_BOOK], ids=["ddpm", "book"])
def test_skip_connections_carry_gradient_with_the_bottleneck_zeroed(model):
  params = _init(model, (1, 16, 16, 3))
  x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
  w = jax.random.normal(jax.random.key(3), x.shape)

  def zero_bottleneck(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    return jnp.zeros_like(out) if context.module.name == "mid_res_1" else out

  def objective(x, params, cut):
    if cut:
      with nn.intercept_methods(zero_bottleneck):
        return jnp.sum(w * model.apply(params, x, jnp.array([100])))
    return jnp.sum(w * model.apply(params, x, jnp.array([100])))

  full = jax.jit(jax.grad(objective), static_argnums=2)(x, params, False)
  cut = jax.jit(jax.grad(objective), static_argnums=2)(x, params, True)
  # The cut really removes the bottleneck's contribution ...
  assert float(jnp.linalg.norm(cut - full)) > 1e-3 * float(jnp.linalg.norm(full))
  # ... and what reaches the input through the skips alone is of the same order as the full gradient.
  assert float(jnp.linalg.norm(cut)) > 0.1 * float(jnp.linalg.norm(full))


def test_time_embedding_changes_the_output(tiny_params):
  x = jax.random.normal(jax.random.key(4), (1, 16, 16, 3))
  apply = jax.jit(TINY.apply)
  a = apply(tiny_params, x, jnp.array([10]))
  b = apply(tiny_params, x, jnp.array([500]))
  assert float(jnp.linalg.norm(a - b)) > 1e-2 * float(jnp.linalg.norm(a))
  # An int and a float t of the same value give the same embedding.
  np.testing.assert_allclose(apply(tiny_params, x, jnp.array([10.0])), a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", [TINY, TINY_BOOK], ids=["ddpm", "book"])
def test_bfloat16_compute_stays_close_to_float32(model):
  params = _init(model, (2, 16, 16, 3))
  x = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
  t = jnp.array([20, 800])
  with jax.default_matmul_precision("float32"):  # the reference: float32 throughout, also on GPUs and TPUs
    f32 = jax.jit(model.apply)(params, x, t)
  bf16_model = model.clone(dtype=jnp.bfloat16)
  bf16 = jax.jit(bf16_model.apply)(params, x, t)
  assert bf16.dtype == jnp.float32 and np.isfinite(np.asarray(bf16)).all()
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  print(f"bf16 vs f32 relative L2 error: {rel:.4f}")
  # bf16 keeps 8 mantissa bits (unit roundoff 2**-9 ≈ 0.002); about 25 layers with
  # float32 normalisation statistics keep the error well inside 25 x 0.002 = 0.05. Rounding the input alone to
  # bf16 already moves it by 2**-9 / sqrt(3) ≈ 1.1e-3 (rms, relative), so an error below 1e-3 means the model did
  # not compute in bf16 (measured: 0.010 and 0.012; float32 twice: 0).
  assert 1e-3 < rel < 0.05


@pytest.mark.slow
@pytest.mark.bitwise
def test_dropout_only_in_training_and_keyed():
  model = unet_preset("tiny", dropout=0.3)
  params = _init(model, (1, 8, 8, 1))
  x = jax.random.normal(jax.random.key(6), (1, 8, 8, 1))
  t = jnp.array([50])
  apply = jax.jit(model.apply, static_argnames="train")
  run = lambda train, seed: apply(params, x, t, train=train, rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  np.testing.assert_array_equal(run(False, 0), apply(params, x, t))
  np.testing.assert_array_equal(run(True, 0), run(True, 0))
  assert float(jnp.max(jnp.abs(run(True, 0) - run(True, 1)))) > 1e-3
  assert float(jnp.max(jnp.abs(run(True, 0) - run(False, 0)))) > 1e-3


@pytest.mark.parametrize(
    "build, shape, fragment",
    [
        (lambda: unet_preset("huge"), None, "unknown UNet preset 'huge'"),
        (lambda: unet_preset("tiny", chanels=3), None, "unknown UNet field(s) chanels"),
        (lambda: unet_preset("tiny", topology="resnet"), (1, 8, 8, 1), "UNet topology='resnet' is unknown"),
        (lambda: unet_preset("tiny"), (1, 10, 10, 1), "image size 10x10 is not divisible by 4"),
        (lambda: unet_preset("tiny", norm_groups=5), (1, 8, 8, 1), "UNet widths [16, 32, 32] are not divisible"),
        (lambda: unet_preset("tiny", dropout=1.0), (1, 8, 8, 1), "UNet dropout=1.0 is out of range"),
        (lambda: unet_preset("tiny", attention="flash"), (1, 8, 8, 1), "UNet attention='flash' is unknown"),
    ],
)
def test_bad_settings_and_inputs_raise_clear_errors(build, shape, fragment):
  with pytest.raises(ValueError, match="^" + re.escape(fragment)):
    model = build()
    _shapes(model, shape)


def test_ddpm_cifar10_uses_the_reference_initialisation():
  assert unet_preset("ddpm_cifar10").init_scheme == "ddpm" and unet_preset("tiny").init_scheme == "flax"
  model = unet_preset("ddpm_cifar10", base_channels=32, channel_mult=(1, 2), attn_resolutions=(4,))
  params = _init(model, (1, 8, 8, 3))["params"]
  flat = {"/".join(k): v for k, v in __import__("flax").traverse_util.flatten_dict(params).items()}
  # The layers that end a residual branch start at zero: each block's second conv, the attention output
  # projection, the head conv.
  zero = [k for k in flat if re.search(r"(_res_\d+|mid_res_\d)/Conv_1/kernel$|_attn(_\d+)?/Dense_1/kernel$|"
                                       r"^head_conv/kernel$", k)]
  # Residual blocks: 2 levels x (2 down + 3 up) + 2 in the middle; attention at 4x4 (level 1): 2 down + 3 up
  # + 1 in the middle; one head.
  assert len(zero) == (2 * 5 + 2) + (2 + 3 + 1) + 1, zero
  for k in zero:
    assert not np.any(np.asarray(flat[k])), k
  # Every other kernel: uniform with variance 1 / fan_avg, so bounded by sqrt(3 / fan_avg) = sqrt(6 / (in + out)).
  for k, w in flat.items():
    if k.endswith("kernel") and k not in zero:
      w = np.asarray(w)
      receptive = int(np.prod(w.shape[:-2])) if w.ndim > 2 else 1
      fan_in, fan_out = receptive * w.shape[-2], receptive * w.shape[-1]
      bound = np.sqrt(6 / (fan_in + fan_out))
      assert np.abs(w).max() <= bound, k
      if w.size >= 2000:  # enough values for the standard deviation to be within 5% of bound / sqrt(3)
        assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.05, (k, w.std(), bound)


def _fingerprint(params):
  """SHA-256 of every parameter's path and float32 bytes."""
  import hashlib  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


@pytest.mark.slow
@pytest.mark.optimized  # bits pinned at XLA's default settings
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="parameter bits are pinned on the CPU backend")
def test_unconditional_parameters_are_unchanged_bit_for_bit_and_conditioning_only_adds_the_label_table():
  # Both models' initialisers in one program at XLA's default settings, as model.init computes them (the pinned
  # bits; create_train_state's compile without LLVM optimisation rounds a few initialisers' last bits otherwise).
  models = [unet_preset("tiny", num_classes=n) for n in (0, 10)]
  plain, cond = jax.jit(lambda key: [init_params(m, key, (1, 16, 16, 3)) for m in models])(jax.random.key(0))
  # Fingerprint of the tiny preset's parameters from key 0, computed with the code before class conditioning
  # existed (commit 1f5efab): num_classes=0 must reproduce them exactly.
  assert _fingerprint(plain) == "2d1761a871008e8f5550969c0bf24341febd4ca9a41a52bb661a8193f46bf5a0"
  table = cond.pop("label_embed")["embedding"]
  assert table.shape == (11, 64)  # N + 1 rows (the last: no label) of the time embedding's width 4 x 16
  assert _fingerprint(cond) == _fingerprint(plain)  # every other parameter as the unconditional model's
  assert count_params(plain) + 11 * 64 == count_params({**cond, "label_embed": table})


@pytest.mark.bitwise
def test_labels_steer_the_output_and_no_label_is_the_last_row():
  model = unet_preset("tiny", num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  t = jnp.array([5, 50, 500, 900])
  params = model.init(jax.random.key(0), x, t)["params"]
  # Make the label rows differ strongly, so that a label that does not reach the network shows.
  params["label_embed"]["embedding"] = jax.random.normal(jax.random.key(2), (4, 64))
  out = lambda labels: np.asarray(model.apply({"params": params}, x, t, labels=labels))
  none = out(None)
  np.testing.assert_array_equal(out(jnp.full(4, -1)), none)  # NO_LABEL = the unconditional row, as None
  a, b = out(jnp.array([0, 1, 2, 0])), out(jnp.array([0, 2, 2, 0]))
  np.testing.assert_array_equal(a[[0, 2, 3]], b[[0, 2, 3]])  # example i depends on label i alone
  assert np.abs(a[1] - b[1]).max() > 1e-3 and np.abs(a - none).max() > 1e-3
  with pytest.raises(ValueError, match=r"label 5 is out of range: use 0..2, or -1 \(no label\)"):
    model.apply({"params": params}, x, t, labels=np.array([0, 5, 1, 1]))
  with pytest.raises(ValueError, match=r"label 3 is out of range: use 0..2, or -1 \(no label\)"):  # N: no class
    model.apply({"params": params}, x, t, labels=np.array([0, 3, 1, 1]))
  with pytest.raises(ValueError, match=r"label -2 is out of range"):
    model.apply({"params": params}, x, t, labels=np.array([0, -2, 1, 1]))
  with pytest.raises(ValueError, match=r"labels were given to an unconditional UNet"):
    unet_preset("tiny").init(jax.random.key(0), x, t, labels=jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"num_classes=-1 is invalid"):
    unet_preset("tiny", num_classes=-1).validate((1, 8, 8, 1))


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_attention_takes_cudnn_only_on_a_gpu_in_bf16_and_computes_what_xla_computes(dtype):
  # book64's deepest attention shape at batch 2: 8x8 pixels, 4 heads of 64 channels.
  q, k, v = (jax.random.normal(key, (2, 64, 4, 64), dtype) for key in jax.random.split(jax.random.key(0), 3))
  fused = jax.default_backend() == "gpu" and dtype == jnp.bfloat16
  text = jax.jit(lambda q, k, v: attend(q, k, v, "auto")).lower(q, k, v).as_text()
  assert ("cudnn$fmha" in text) == fused  # the custom call of cuDNN's fused attention, or XLA's dot products
  with jax.default_matmul_precision("float32"):
    got, xla = (np.asarray(attend(q, k, v, a), np.float32) for a in ("auto", "xla"))
  if not fused:
    np.testing.assert_array_equal(got, xla)  # the same program
  else:  # one bf16 rounding of the output apart (2^-8 relative), plus the fused kernel's own bf16 probabilities
    np.testing.assert_allclose(got, xla, atol=4 * 2.0**-8 * np.abs(xla).max())
