"""The FID Inception-v3 network in Flax, its weight file, and FID / IS / KID of samples against cached real statistics.

The architecture is the one the standard FID weights were trained with (the
TF 2015-12-05 graph, as ported by pytorch-fid): torchvision's Inception-v3
without the auxiliary head, 1008 classes, average pools that exclude padding,
and a max pool in the last block's pooling branch. Weights come from a file
the user names (tools/convert_inception_weights.py writes it); nothing is
downloaded. Features are the 2048-d pool3 activations of images resized
(bilinearly, no antialiasing) to 299x299.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import flax.serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import metrics

INPUT_SIZE = 299
FEATURES = 2048
CLASSES = 1008
Padding = Sequence[tuple[int, int]]


def _pad(kernel: tuple[int, int]) -> Padding:
  """'Same' padding of an odd kernel at stride 1."""
  return tuple((k // 2, k // 2) for k in kernel)


class BasicConv(nn.Module):
  """Convolution without bias, batch norm (running statistics, eps 1e-3), ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: Padding | str = "VALID"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=self.padding, use_bias=False,
                name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """3x3 stride-1 average over the valid (unpadded) pixels of each window."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jnp.ndarray, stride: int = 2, pad: int = 0) -> jnp.ndarray:
  """3x3 max pool."""
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b..5d: 1x1, 5x5, double 3x3 and pooled branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(64, (5, 5), padding=_pad((5, 5)), name="branch5x5_2")(BasicConv(48, name="branch5x5_1")(x))
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c7 = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=_pad((1, 7)), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad((7, 1)), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    for i, (kernel, out) in enumerate([((7, 1), c7), ((1, 7), c7), ((7, 1), c7), ((1, 7), 192)], start=2):
      bd = BasicConv(out, kernel, padding=_pad(kernel), name=f"branch7x7dbl_{i}")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(BasicConv(192, name="branch3x3_1")(x))
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=_pad((1, 7)), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad((7, 1)), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c: expanded filter banks; the FID graph pools by average in 7b and by max in 7c."""
  max_pool: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    def split(h: jnp.ndarray, prefix: str) -> jnp.ndarray:
      a = BasicConv(384, (1, 3), padding=_pad((1, 3)), name=f"{prefix}a")(h)
      b = BasicConv(384, (3, 1), padding=_pad((3, 1)), name=f"{prefix}b")(h)
      return jnp.concatenate([a, b], axis=-1)

    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = split(BasicConv(384, name="branch3x3_1")(x), "branch3x3_2")
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = split(BasicConv(384, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(bd), "branch3x3dbl_3")
    pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: images [N, 299, 299, 3] in [-1, 1] -> (pool3 features [N, 2048], logits [N, 1008])."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = _max_pool(BasicConv(64, (3, 3), padding=_pad((3, 3)), name="Conv2d_2b_3x3")(x))
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = _max_pool(BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x))
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    features = x.mean(axis=(1, 2))
    return features, nn.Dense(CLASSES, name="fc")(features)


def prepare(images: jnp.ndarray) -> jnp.ndarray:
  """Images [N, H, W, 1 or 3] in [-1, 1] as the network's input: RGB, bilinearly resized to 299x299."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Inception features take images [N, H, W, 1 or 3], got shape {images.shape}")
  x = jnp.broadcast_to(images, images.shape[:3] + (3,)).astype(jnp.float32)
  return jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)


def template() -> Any:
  """The shapes and dtypes of the network's variables ({'params', 'batch_stats'}), without computing them."""
  return jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))


def _flat(tree: Any) -> dict[str, Any]:
  """A nested dict as {'a/b/c': leaf}."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def check_variables(variables: Any, origin: str) -> Any:
  """Returns variables as float32 NumPy if they match the network's names and shapes, else a ValueError."""
  want, got = _flat(template()), _flat(variables)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{origin} does not hold FID Inception-v3 variables: {len(missing)} missing (first: "
                     f"{missing[:1]}), {len(extra)} unexpected (first: {extra[:1]})")
  for name, spec in want.items():
    if tuple(np.shape(got[name])) != spec.shape:
      raise ValueError(f"{origin}: {name} has shape {tuple(np.shape(got[name]))}, the network needs {spec.shape}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32) for k, v in got.items()})


def check_weights_path(path: str) -> None:
  """Raises ValueError unless path names an existing file (the weights a run will need for FID)."""
  if not path:
    raise ValueError("no Inception weights given: set config.inception_weights to the file that "
                     "tools/convert_inception_weights.py wrote (see docs/evaluation.md)")
  if not os.path.isfile(path):
    raise ValueError(f"inception_weights={path!r} is not a file: convert the FID weights with "
                     "tools/convert_inception_weights.py first")


def load_variables(path: str) -> Any:
  """The network's variables from a msgpack file written by tools/convert_inception_weights.py."""
  check_weights_path(path)
  with open(path, "rb") as f:
    try:
      state = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on garbage
      raise ValueError(f"inception_weights={path!r} is not a msgpack weight file ({type(e).__name__})") from e
  return check_variables(state, f"inception_weights={path!r}")


def save_variables(variables: Any, path: str) -> None:
  """Writes checked variables as msgpack, atomically."""
  data = flax.serialization.msgpack_serialize(check_variables(variables, "the variables to save"))
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def from_torch_state_dict(state_dict: dict[str, np.ndarray]) -> Any:
  """Network variables from a pytorch-fid / torchvision FID Inception state dict of NumPy arrays."""
  variables: dict[tuple[str, ...], np.ndarray] = {}
  for name, value in state_dict.items():
    *path, leaf = name.split(".")
    value = np.asarray(value, np.float32)
    if leaf == "num_batches_tracked" or (path and path[0] == "AuxLogits"):
      continue
    if path[-1:] == ["conv"] and leaf == "weight":  # OIHW -> HWIO
      variables[("params", *path, "kernel")] = value.transpose(2, 3, 1, 0)
    elif path[-1:] == ["bn"] and leaf in ("weight", "bias"):
      variables[("params", *path, "scale" if leaf == "weight" else "bias")] = value
    elif path[-1:] == ["bn"] and leaf in ("running_mean", "running_var"):
      variables[("batch_stats", *path, "mean" if leaf == "running_mean" else "var")] = value
    elif path == ["fc"]:
      variables[("params", "fc", "kernel" if leaf == "weight" else "bias")] = value.T if leaf == "weight" else value
    else:
      raise ValueError(f"unexpected tensor {name!r} in the state dict: is this the FID Inception-v3?")
  return check_variables(traverse_util.unflatten_dict(variables), "the converted state dict")


def weights_fingerprint(path: str) -> str:
  """The first 16 hex digits of the weight file's SHA-256 (names the reference statistics computed with it)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


@jax.jit
def features(variables: Any, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(pool3 features [N, 2048], logits [N, 1008]) of images [N, H, W, 1 or 3] in [-1, 1]."""
  return InceptionV3().apply(variables, prepare(images))


def make_extractor(variables: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """features() bound to variables, taking and returning NumPy (float64 out)."""
  return lambda x: tuple(np.asarray(a, np.float64) for a in features(variables, np.asarray(x, np.float32)))


def batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
  """Consecutive slices of at most batch_size images."""
  return (images[i:i + batch_size] for i in range(0, len(images), batch_size))


def reference_features(extractor: Callable, real_batches: Iterable[np.ndarray], num_real: int,
                       progress: Callable[[int, int], None] = lambda done, total: None) -> np.ndarray:
  """pool3 features of the first num_real real images of an iterable of batches."""
  feats, seen = [], 0
  for batch in real_batches:
    batch = batch[:num_real - seen]
    feats.append(extractor(batch)[0])
    seen += len(batch)
    progress(seen, num_real)
    if seen >= num_real:
      break
  if seen < num_real:
    raise ValueError(f"the dataset gave {seen} real images, fewer than fid_num_real={num_real}")
  return np.concatenate(feats)


def cached_reference(path: str, compute: Callable[[], np.ndarray], fingerprint: str) -> dict[str, np.ndarray]:
  """{'mu', 'sigma', 'features'} of real images, from path if it was made with the same weights, else computed."""
  if os.path.exists(path):
    with np.load(path) as cached:
      if str(cached["fingerprint"]) == fingerprint:
        return {k: cached[k] for k in ("mu", "sigma", "features")}
  real = compute()
  mu, sigma = metrics.feature_stats(real)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, mu=mu, sigma=sigma, features=real.astype(np.float32), fingerprint=fingerprint)
  os.replace(path + ".tmp", path)
  return {"mu": mu, "sigma": sigma, "features": real}


def score(extractor: Callable, samples: np.ndarray, reference: dict[str, np.ndarray], batch_size: int = 100
          ) -> dict[str, Any]:
  """FID, KID and Inception score of samples in [-1, 1] against reference statistics."""
  fake, logits = metrics.extract(extractor, batches(samples, batch_size))
  is_mean, is_std = metrics.inception_score(logits)
  kid_mean, kid_std = metrics.kernel_inception_distance(fake, reference["features"])
  return {
      "num_samples": int(len(samples)),
      "num_real": int(len(reference["features"])),
      "fid": metrics.frechet_distance(*metrics.feature_stats(fake), reference["mu"], reference["sigma"]),
      "kid": kid_mean,
      "kid_std": kid_std,
      "inception_score": is_mean,
      "inception_score_std": is_std,
  }


def report(result: dict[str, Any]) -> str:
  """One line of a score() result."""
  return (f"{result['num_samples']} samples vs {result['num_real']} real: FID {result['fid']:.2f}, "
          f"KID {result['kid']:.4f} ± {result['kid_std']:.4f}, IS {result['inception_score']:.2f} "
          f"± {result['inception_score_std']:.2f}")
