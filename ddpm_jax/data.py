"""Input pipelines: the embedded digits, TFDS datasets and image folders, as seeded endless batch streams.

Epoch e visits the records in an order fixed by (seed, e), and every random
choice about a record (the flip) is a stateless function of (seed, e, position
in the epoch), so the batch at step N is a pure function of (config, seed, N):
resuming at step N rebuilds the stream from there, with no iterator state to
checkpoint. Indexable sources (digits, folders) are shuffled by a global
permutation and each process decodes only its slice of every global batch, so
their batches do not depend on the number of processes or devices. TFDS
sources are read sequentially: each process reads its own even split through a
shuffle buffer.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
from absl import logging
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SHOWN_BAD_FILES = 5  # undecodable files named in the warning; the rest are counted


@functools.lru_cache(maxsize=None)
def _tf():
  """TensorFlow, imported on first use and kept off any accelerator."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # heavy (seconds): only when a pipeline is built

  tf.config.set_visible_devices([], "GPU")
  return tf


def _plain(fn: Callable) -> Callable:
  """fn for tf.data.Dataset.map without autograph: it is plain TensorFlow already, and autograph's converted
  copies are temporary files that a killed process leaves behind."""
  return _tf().autograph.experimental.do_not_convert(fn)


@dataclass(frozen=True)
class Source:
  """Records and how to turn one into a uint8 HWC image.

  Exactly one of `items` (indexable, the same on every process) and `records`
  (a sequential tf.data.Dataset, this process's split) is set.
  """

  size: int
  decode: Callable  # (record, channels) -> uint8 [h, w, channels] tensor
  items: Optional[np.ndarray] = None
  records: object = None


def parse_dataset(spec: str) -> tuple[str, str]:
  """'digits' | 'tfds:<name>' | 'folder:<path>' -> (kind, argument)."""
  if spec == "digits":
    return "digits", ""
  kind, sep, arg = str(spec).partition(":")
  if sep and kind in ("tfds", "folder") and arg:
    return kind, arg
  raise ValueError(f"dataset={spec!r} is not understood: use 'digits', 'tfds:<name>' (e.g. 'tfds:cifar10') "
                   "or 'folder:<path>'")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 1,797 8x8 digits (no download): uint8 [N, 8, 8, 1] in 0..255, and int labels [N]."""
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=g-import-not-at-top  # heavy

  bunch = sklearn_digits()  # pixel values 0..16
  return np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None], bunch.target.astype(np.int32)


def digits_source() -> Source:
  """The embedded digits."""
  images, _ = load_digits()
  return Source(len(images), convert_channels, items=images)


def list_images(root: str) -> list[str]:
  """Image files under root (nested folders too), sorted."""
  if not os.path.isdir(root):
    raise ValueError(f"dataset folder {root!r} does not exist or is not a folder")
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"dataset folder {root!r} holds no images: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
  return paths


def _decodable(path: str) -> bool:
  """Whether PIL can fully decode the file."""
  try:
    with Image.open(path) as im:
      im.load()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def folder_source(root: str) -> Source:
  """The decodable images under root; undecodable files are skipped with one warning."""
  tf = _tf()
  paths = list_images(root)
  ok = [_decodable(p) for p in paths]
  good = [p for p, k in zip(paths, ok) if k]
  bad = [p for p, k in zip(paths, ok) if not k]
  if bad:
    shown = ", ".join(bad[:SHOWN_BAD_FILES]) + (f" and {len(bad) - SHOWN_BAD_FILES} more" if len(bad) > SHOWN_BAD_FILES else "")
    logging.warning("skipped %d of %d files in %s that could not be decoded: %s", len(bad), len(paths), root, shown)
  if not good:
    raise ValueError(f"dataset folder {root!r} holds no decodable images ({len(paths)} files failed to decode)")
  decode = lambda p, c: decode_image(tf.io.read_file(p), c)
  return Source(len(good), decode, items=np.array(good))


def _reachable(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to TFDS's download mirror opens within `timeout` seconds."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def tfds_source(name: str, split: str, data_dir: Optional[str], download: bool, process_index: int,
                process_count: int) -> Source:
  """A TFDS split, this process's even share, images left encoded until the pipeline decodes them."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy: only for tfds: datasets

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown TFDS dataset {name!r}: see the TFDS catalog for names "
                     "(e.g. cifar10, oxford_flowers102, mnist, fashion_mnist, celeb_a)") from None
  if "image" not in builder.info.features:
    raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (it has {', '.join(builder.info.features)})")
  shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  load = lambda: builder.as_dataset(split=shard, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)
  try:
    ds = load()
  except AssertionError:  # TFDS's "could not find data in <data_dir>"
    where = builder.data_dir_root
    how = (f"prepare it on a connected machine with `tfds build {name} --data_dir=DIR`, copy DIR here, and point "
           "config.data.data_dir (or TFDS_DATA_DIR) at it")
    if not download:
      raise ValueError(f"TFDS dataset {name!r} is not prepared in {where} and config.data.download is off: "
                       f"{how}") from None
    if not _reachable():
      raise ValueError(f"TFDS dataset {name!r} is not prepared in {where} and the network is unreachable: "
                       f"{how}") from None
    builder.download_and_prepare()
    ds = load()
  size = int(ds.cardinality())
  if size < 1:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty for process {process_index} of {process_count}")
  return Source(size, decode_image, records=ds.map(_plain(lambda ex: ex["image"])))


def decode_image(encoded, channels: int):
  """PNG/JPEG bytes -> uint8 [h, w, channels], converting gray <-> RGB and dropping alpha."""
  return _tf().io.decode_image(encoded, channels=channels, expand_animations=False)


def convert_channels(image, channels: int):
  """uint8 [h, w, c] with c known -> [h, w, channels]."""
  tf = _tf()
  c = image.shape[-1]
  if c == channels:
    return image
  return tf.image.grayscale_to_rgb(image) if c == 1 else tf.image.rgb_to_grayscale(image[..., :3])


def preprocess(image, size: int, channels: int, flip):
  """uint8 HWC -> float32 [size, size, channels] in [-1, 1]: short side to size (bilinear, antialiased), center crop, optional flip."""
  tf = _tf()
  image = convert_channels(image, channels)
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  scale = size / tf.minimum(h, w)
  nh = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
  nw = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
  image = tf.image.resize(tf.cast(image, tf.float32), [nh, nw], method="bilinear", antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  image = image[top:top + size, left:left + size, :]
  image = tf.cond(flip, lambda: image[:, ::-1, :], lambda: image)
  image = tf.clip_by_value(image, 0.0, 255.0) / 127.5 - 1.0
  image.set_shape([size, size, channels])
  return image


def _epoch_seed(seed: int, epoch):
  """A per-epoch seed, distinct for every (seed, epoch)."""
  tf = _tf()
  return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def flip_coins(seed: int, epoch: np.ndarray, index: np.ndarray) -> np.ndarray:
  """A fair, stateless coin per (seed, epoch, position in epoch): splitmix64 of the three, top bit."""
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
    x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.asarray(epoch).astype(np.uint64) * np.uint64(1_000_003)
         + np.asarray(index).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(63)).astype(bool)


def indexed_positions(size: int, seed: int, start_step: int, global_batch: int, process_index: int,
                      process_count: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per step: (epoch, position in epoch, record index) arrays of this process's slice of the global batch."""
  local = global_batch // process_count
  perms: dict[int, np.ndarray] = {}
  for step in range(start_step, 2**62):
    pos = step * global_batch + process_index * local + np.arange(local, dtype=np.int64)
    epoch, index = np.divmod(pos, size)
    for e in set(epoch.tolist()) - set(perms):
      perms[e] = np.random.default_rng([seed, e]).permutation(size)
    for e in [e for e in perms if e < epoch[0]]:
      del perms[e]
    yield epoch, index, np.array([perms[e][i] for e, i in zip(epoch.tolist(), index.tolist())], np.int64)


def sequential_records(source: Source, seed: int, start: int, shuffle_buffer: int):
  """Endless (epoch, position in epoch, record) stream of a sequential source from position `start`."""
  tf = _tf()
  first_epoch, offset = divmod(start, source.size)
  buffer = max(1, min(source.size, shuffle_buffer))

  def epoch(e):
    ds = source.records.shuffle(buffer, seed=_epoch_seed(seed, e), reshuffle_each_iteration=False)
    return ds.enumerate().map(_plain(lambda i, r: (e, i, r)))

  return tf.data.Dataset.range(first_epoch, 2**40).flat_map(_plain(epoch)).skip(offset)


def in_memory(source: Source, image_size: int, channels: int) -> bool:
  """Whether the source holds decoded uint8 images of exactly this size and channel count (no resizing needed)."""
  items = source.items
  return (items is not None and items.dtype == np.uint8 and items.ndim == 4
          and items.shape[1:] == (image_size, image_size, channels))


def _array_batches(items: np.ndarray, positions: Iterator, seed: int, random_flip: bool) -> Iterator[np.ndarray]:
  """Batches gathered from in-memory uint8 images, scaled to [-1, 1] and flipped by flip_coins, as tf.data would."""
  for epoch, index, records in positions:
    batch = items[records].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if random_flip:
      batch = np.where(flip_coins(seed, epoch, index)[:, None, None, None], batch[:, :, ::-1], batch)
    yield batch


def make_source(dataset: str, *, data_dir: Optional[str] = None, split: str = "train", download: bool = True,
                process_index: int = 0, process_count: int = 1) -> Source:
  """The Source a dataset string names (for TFDS, this process's even split)."""
  kind, arg = parse_dataset(dataset)
  if kind == "digits":
    return digits_source()
  if kind == "folder":
    return folder_source(arg)
  return tfds_source(arg, split, data_dir, download, process_index, process_count)


def batch_stream(source: Source, *, seed: int, global_batch: int, image_size: int, channels: int = 3,
                 random_flip: bool = True, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                 shuffle_buffer: int = 50_000) -> Iterator[np.ndarray]:
  """Endless float32 batches [global_batch / process_count, size, size, channels]: this process's rows of each
  global batch, from start_step. Decoded in-memory images already of the target size and channels (the embedded
  digits) are gathered with NumPy; everything else goes through tf.data."""
  if channels not in (1, 3):
    raise ValueError(f"channels={channels!r} is invalid: use 1 (grayscale) or 3 (RGB)")
  if image_size < 1:
    raise ValueError(f"image_size={image_size!r} is invalid: it must be a positive integer")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} is not divisible by the {process_count} processes: "
                     f"use a multiple of {process_count}")
  local = global_batch // process_count

  positions = lambda: indexed_positions(source.size, seed, start_step, global_batch, process_index, process_count)
  if in_memory(source, image_size, channels):
    return _array_batches(source.items, positions(), seed, random_flip)
  tf = _tf()
  if source.items is not None:  # flips decided by flip_coins, as in _array_batches
    items = tf.constant(source.items)
    flipped = lambda: ((e, i, k, flip_coins(seed, e, i)) for e, i, k in positions())
    ds = tf.data.Dataset.from_generator(flipped, output_signature=(tf.TensorSpec([local], tf.int64),) * 3
                                        + (tf.TensorSpec([local], tf.bool),))
    ds = ds.unbatch().map(_plain(lambda e, i, k, f: (f, tf.gather(items, k))))
  else:
    def coin(epoch, index, record):
      u = tf.random.stateless_uniform([], seed=tf.stack([_epoch_seed(seed, epoch), index]))
      return u < 0.5, record
    ds = sequential_records(source, seed, start_step * local, shuffle_buffer).map(_plain(coin))

  def prepare(flip, record):
    return preprocess(source.decode(record, channels), image_size, channels, tf.logical_and(random_flip, flip))

  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options).map(_plain(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
