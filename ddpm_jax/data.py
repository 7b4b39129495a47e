"""Input pipelines on Grain: the embedded digits, TFDS datasets (ArrayRecord) and image folders as seeded batch streams.

Every source is random access, and every stream is one Grain `MapDataset`:
the record indices shuffled by a permutation fixed per (seed, epoch) and
repeated endlessly; a flip coin per stream position (seed, position); read,
decoded, resized and cropped per element (in Grain worker processes for files);
batched; and the local batches dealt out to the processes (process p of P takes
local batch s * P + p, its rows of global batch s). So the batch at step N is a
pure function of (config, seed, N) whatever the number of processes, and a run
resumed at step N slices the stream from there, with no iterator state to save.
No TensorFlow: TFDS datasets are read through `tfds.data_source`.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import importlib.util
import io
import os
import signal
import stat
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import grain
import numpy as np
from absl import flags, logging
from PIL import Image, UnidentifiedImageError

from ddpm_jax import runtime
from ddpm_jax.labels import NO_LABEL

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NAMED_SKIPS = 100  # unreadable files named one warning each per decoding process; beyond, every 1,000th
# A file's read errors that last (skipped), as opposed to EIO, ESTALE, EMFILE... (raised); None: PIL's decode errors
LASTING_ERRNOS = (None, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM)
_SKIP_LOCK = threading.Lock()
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit (and 32-bit integer) gray images
PREPARE_COMMAND = ("pip install -r requirements-prepare.txt && "
                   "tfds build {name} --file_format=array_record --data_dir=DIR")
MAX_AUTO_WORKERS = 16


@dataclass(frozen=True)
class Source:
  """A random-access dataset: `read(i)` is record i as (uint8 HWC image, int label, NO_LABEL when unlabelled)."""

  size: int
  read: Callable[[int], tuple[np.ndarray, int]]
  class_names: tuple[str, ...] = ()  # labelled sources: the class of each label, in label order
  arrays: Optional[tuple[np.ndarray, np.ndarray]] = None  # (images, labels) held decoded in memory
  identity: Optional[dict[str, Any]] = None  # what names this data exactly (name and version, or a hash), for records

  @property
  def num_classes(self) -> int:
    """Number of classes (0: unlabelled)."""
    return len(self.class_names)


def parse_dataset(spec: str) -> tuple[str, str]:
  """'digits' | 'tfds:<name>' | 'folder:<path>' -> (kind, argument)."""
  if spec == "digits":
    return "digits", ""
  kind, sep, arg = str(spec).partition(":")
  if sep and kind in ("tfds", "folder") and arg:
    return kind, arg
  raise ValueError(f"dataset={spec!r} is not understood: use 'digits', 'tfds:<name>' (e.g. 'tfds:cifar10') "
                   "or 'folder:<path>'")


def _digits_table() -> str:
  """The file of scikit-learn's bundled digits (per row: 64 pixels in 0..16, then the label), found without importing
  sklearn.datasets, which imports SciPy and would slow every training process's start (CONTRIBUTING.md, "Test time")."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("dataset='digits' needs scikit-learn: pip install scikit-learn")
  return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 1,797 8x8 digits (no download): uint8 [N, 8, 8, 1] in 0..255, and int labels [N]."""
  table = np.loadtxt(_digits_table(), delimiter=",")
  pixels = table[:, :-1].reshape(-1, 8, 8)  # 0..16
  return np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None], table[:, -1].astype(np.int32)


def _read_arrays(images: np.ndarray, labels: np.ndarray, index: int) -> tuple[np.ndarray, int]:
  """Record `index` of in-memory arrays."""
  return images[index], int(labels[index])


def array_source(images: np.ndarray, labels: Optional[np.ndarray] = None, class_names: Sequence[str] = (),
                 identity: Optional[dict[str, Any]] = None) -> Source:
  """A source of uint8 NHWC images held in memory, labelled when `class_names` is given."""
  labels = np.full(len(images), NO_LABEL, np.int32) if labels is None else np.asarray(labels, np.int32)
  return Source(len(images), functools.partial(_read_arrays, images, labels), tuple(class_names), (images, labels),
                identity)


def sha256_file(path: str) -> str:
  """The SHA-256 of a file's bytes, in hex."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def digits_source() -> Source:
  """The embedded digits, labelled 0..9."""
  identity = {"name": "digits", "sha256": sha256_file(_digits_table())}
  return array_source(*load_digits(), class_names=[str(k) for k in range(10)], identity=identity)


def decode_file(path: str) -> np.ndarray:
  """A PNG/JPEG file -> uint8 [h, w, 1] (grayscale files) or [h, w, 3] (colour; alpha dropped); 16-bit gray is
  scaled to 8 bits (v / 257, rounded), not clipped."""
  with open(path, "rb") as f:
    with Image.open(io.BytesIO(f.read())) as im:
      if im.mode in WIDE_GRAY_MODES:
        wide = np.asarray(im).astype(np.float64)
        return np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8).reshape(im.size[1], im.size[0], 1)
      gray = im.mode in ("1", "L", "LA", "F")
      return np.asarray(im.convert("L" if gray else "RGB")).reshape(im.size[1], im.size[0], -1)


def decode_regular_file(path: str) -> np.ndarray:
  """decode_file for a regular file; anything else (a FIFO, a device, a folder) raises ValueError unopened."""
  if not stat.S_ISREG(os.stat(path).st_mode):
    raise ValueError("not a regular file")
  return decode_file(path)


def _skippable(error: Exception) -> bool:
  """Whether a file's read failed for good (damaged, vanished, not a regular file, not permitted), not for a
  moment (EIO, ESTALE, too many open files...: raised, so that no run silently reads other images)."""
  return not isinstance(error, OSError) or error.errno in LASTING_ERRNOS


def _warn_skip(path: str, error: Exception, root: str, skipped: set[str]) -> None:
  """Counts `path` as skipped in this decoding process and names it (the first NAMED_SKIPS, then every 1,000th)."""
  with _SKIP_LOCK:  # Grain's reading threads share `skipped`; the counts are logged in order
    if path in skipped:
      return
    skipped.add(path)
    if len(skipped) <= NAMED_SKIPS or len(skipped) % 1000 == 0:
      why = ("not an image PIL can decode" if isinstance(error, UnidentifiedImageError)
             else f"{type(error).__name__}: {error}")
      logging.warning("skipped %s, which cannot be read (%s): the next file of the listing stands in for it; %d "
                      "file(s) of %s skipped so far in this decoding process", path, why, len(skipped), root)


def _read_file(root: str, files: np.ndarray, labels: np.ndarray, skipped: set[str],
               index: int) -> tuple[np.ndarray, int]:
  """Record `index` of a folder: its file decoded and its label, or, where that file cannot be read for good, the
  next readable file of the listing and its label (the batch keeps its shape; every process reads alike)."""
  for k in range(len(files)):
    j = (index + k) % len(files)
    path = os.path.join(root, str(files[j]))
    try:
      return decode_regular_file(path), int(labels[j])
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds for damaged files
      if not _skippable(e):
        raise
      _warn_skip(path, e, root, skipped)
  raise ValueError(f"dataset folder {root!r} holds no readable images: all {len(files)} listed files failed")


def list_images(root: str) -> list[str]:
  """Image files under root (nested folders too), as sorted paths relative to root; nothing is opened."""
  if not os.path.isdir(root):
    raise ValueError(f"dataset folder {root!r} does not exist or is not a folder")
  paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"dataset folder {root!r} holds no images: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
  return paths


def pack_listing(files: Sequence[str]) -> str:
  """A listing as compressed text (for the coordination service's key-value store)."""
  return base64.b64encode(zlib.compress("\0".join(files).encode("utf-8"), 6)).decode("ascii")


def unpack_listing(packed: str) -> list[str]:
  """The listing pack_listing packed."""
  text = zlib.decompress(base64.b64decode(packed)).decode("utf-8")
  return text.split("\0") if text else []


def folder_classes(files: Sequence[str]) -> tuple[str, ...]:
  """The sorted class subfolders when every image (a path relative to the root) lies inside a subfolder, else ()
  (unlabelled)."""
  tops = [f.split(os.sep) for f in files]
  if any(len(parts) < 2 for parts in tops):
    return ()
  return tuple(sorted({parts[0] for parts in tops}))


def folder_source(root: str, listing: Optional[Sequence[str]] = None) -> Source:
  """The images under root, or those of `listing` (paths relative to root, as process 0 listed them), labelled by
  class subfolder when there are some. Nothing is opened here: files are vetted as they are read (_read_file)."""
  if listing is not None and not os.path.isdir(root):
    raise ValueError(f"dataset folder {root!r} does not exist or is not a folder")
  files = list(listing) if listing is not None else list_images(root)
  if not files:
    raise ValueError(f"dataset folder {root!r} holds no images: the listing given is empty")
  classes = folder_classes(files)
  index = {name: k for k, name in enumerate(classes)}
  labels = np.array([index[f.split(os.sep)[0]] if classes else NO_LABEL for f in files], np.int32)
  listing_hash = hashlib.sha256("\n".join(files).encode("utf-8")).hexdigest()
  identity = {"name": f"folder:{root}", "files": len(files), "listing_sha256": listing_hash}
  return Source(len(files), functools.partial(_read_file, root, np.array(files), labels, set()), classes,
                identity=identity)


def _read_tfds(records: Any, has_label: bool, index: int) -> tuple[np.ndarray, int]:
  """Record `index` of a TFDS data source: its decoded image and label."""
  example = records[index]
  return np.asarray(example["image"]), int(example["label"]) if has_label else NO_LABEL


def tfds_source(name: str, split: str, data_dir: Optional[str]) -> Source:
  """A prepared TFDS split (ArrayRecord), read without TensorFlow; labelled when it has a class `label` feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only for tfds: datasets

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown TFDS dataset {name!r}: see the TFDS catalog for names "
                     "(e.g. cifar10, oxford_flowers102, mnist, fashion_mnist, celeb_a)") from None
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (it has {', '.join(features)})")
  not_prepared = lambda e: ValueError(
      f"TFDS dataset {name!r} is not prepared as ArrayRecord in {builder.data_dir_root}: prepare it once with "
      f"`{PREPARE_COMMAND.format(name=name)}` and point config.data.data_dir (or TFDS_DATA_DIR) at DIR "
      f"({type(e).__name__})")
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except KeyError as e:  # a split TFDS does not list: an unknown name, or none at all (not prepared)
    if builder.info.splits:
      raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (config.data.split): it has "
                       f"{', '.join(builder.info.splits)}") from None
    raise not_prepared(e) from None
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:  # TFDS's other ways of saying "not prepared"
    raise not_prepared(e) from None
  if len(records) < 1:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
  label = features["label"] if "label" in features else None
  classes = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else ()
  identity = {"name": f"tfds:{name}", "version": str(builder.info.version), "split": split, "records": len(records)}
  return Source(len(records), functools.partial(_read_tfds, records, bool(classes)), classes, identity=identity)


def make_source(dataset: str, *, data_dir: Optional[str] = None, split: str = "train") -> Source:
  """The Source a dataset string names."""
  kind, arg = parse_dataset(dataset)
  if kind == "digits":
    return digits_source()
  if kind == "folder":
    return folder_source(arg)
  return tfds_source(arg, split, data_dir)


def evaluation_source(dataset: str, *, data_dir: Optional[str] = None, split: str = "train") -> tuple[Source, str]:
  """The images a trained model is evaluated on, and which they are: a TFDS dataset's test split where it has one,
  else the training images (the digits, a folder, the `split` of a TFDS dataset without a test split)."""
  kind, arg = parse_dataset(dataset)
  if kind == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # only for tfds: datasets

    try:
      splits = tfds.builder(arg, data_dir=data_dir).info.splits
    except tfds.core.registered.DatasetNotFoundError:
      splits = {}  # make_source names the problem
    if "test" in splits:
      return tfds_source(arg, "test", data_dir), f"the test split of {arg}"
    return make_source(dataset, data_dir=data_dir, split=split), f"the {split} split of {arg}, which has no test split"
  source = make_source(dataset, data_dir=data_dir, split=split)
  return source, f"the training images of {dataset}, which has no test split"


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B in gray; summing to 1, they map repeated gray to itself


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 [h, w, c] -> [h, w, channels]: gray repeated to RGB, RGB(A) to gray by LUMA."""
  c = image.shape[-1]
  if c == channels:
    return image
  if channels == 3:
    return np.repeat(image[..., :1], 3, axis=-1)
  luma = image[..., :3].astype(np.float32) @ np.array(LUMA, np.float32)
  return np.round(luma).astype(np.uint8)[..., None]


def _resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
  """One float32 channel resized bilinearly (antialiased when shrinking: the filter widens with the scale)."""
  return np.asarray(Image.fromarray(plane, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def preprocess(image: np.ndarray, size: int, channels: int, flip: bool) -> np.ndarray:
  """uint8 HWC -> float32 [size, size, channels] in [-1, 1]: short side to size, center crop, optional flip."""
  image = convert_channels(np.asarray(image), channels)
  h, w = image.shape[:2]
  out = image.astype(np.float32)
  if (h, w) != (size, size):
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = np.stack([_resize(out[..., c], nh, nw)[top:top + size, left:left + size] for c in range(channels)], -1)
    out = np.clip(out, 0.0, 255.0)
  if flip:
    out = out[:, ::-1]
  return out / np.float32(127.5) - np.float32(1.0)


@functools.lru_cache(maxsize=8)
def _seeds(seed: int) -> tuple[int, int]:
  """(shuffle seed, flip seed): 32-bit seeds drawn from the run's seed, so that no two runs share epochs."""
  shuffle, flip = np.random.SeedSequence(seed).generate_state(2)
  return int(shuffle), int(flip)


STREAM_LENGTH = 2**62  # stream positions: finitely many (Grain's lengths of an endless dataset overflow)
_SPLITMIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, shuffle_seed: int, epoch: int) -> np.ndarray:
  """The record order of one epoch: a permutation of range(size) seeded by (shuffle seed, epoch)."""
  return np.random.default_rng([shuffle_seed, epoch]).permutation(size)


def _coins(flip_seed: int, positions: np.ndarray) -> np.ndarray:
  """A fair coin per stream position: the top bit of SplitMix64's output mix of (flip_seed + position + its
  increment)."""
  add, mul1, mul2 = _SPLITMIX
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as SplitMix64 means it to
    z = positions.astype(np.uint64) + np.uint64(flip_seed) + add
    z = (z ^ (z >> np.uint64(30))) * mul1
    z = (z ^ (z >> np.uint64(27))) * mul2
  return ((z ^ (z >> np.uint64(31))) >> np.uint64(63)).astype(bool)


def stream_records(positions: np.ndarray, size: int, seed: int, random_flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """Stream positions -> (record indices, flips): a fresh permutation every epoch, a coin per position."""
  shuffle_seed, flip_seed = _seeds(seed)
  positions = np.asarray(positions, np.int64)
  epochs, within = np.divmod(positions, size)
  records = np.empty_like(positions)
  for epoch in np.unique(epochs):
    here = epochs == epoch
    records[here] = _epoch_order(size, shuffle_seed, int(epoch))[within[here]]
  flips = _coins(flip_seed, positions) if random_flip else np.zeros(positions.shape, bool)
  return records, flips


def _record_at(size: int, seed: int, random_flip: bool, position: int) -> tuple[int, bool]:
  """Stream position -> (record index, flip), one at a time (for sources read per record)."""
  records, flips = stream_records(np.array([position]), size, seed, random_flip)
  return int(records[0]), bool(flips[0])


def _prepare(source: Source, size: int, channels: int, record_flip: tuple[int, bool]) -> tuple[np.ndarray, np.int32]:
  """(record, flip) -> (float32 image in [-1, 1], int32 label)."""
  image, label = source.read(record_flip[0])
  return preprocess(image, size, channels, record_flip[1]), np.int32(label)


_SCALE = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # uint8 -> [-1, 1], as preprocess


def _gather(arrays: tuple[np.ndarray, np.ndarray], size: int, seed: int, random_flip: bool, local: int,
            batch_index: int) -> tuple[np.ndarray, np.ndarray]:
  """Local batch `batch_index` of in-memory images at the target size -> (float32 images, int32 labels): the
  records and flips of its stream positions, gathered and flipped as uint8, then scaled by table."""
  images, labels = arrays
  records, flips = stream_records(np.arange(batch_index * local, (batch_index + 1) * local), size, seed, random_flip)
  out = images[records]
  out[flips] = out[flips][:, :, ::-1]
  return _SCALE[out], labels[records]


def in_memory(source: Source, image_size: int, channels: int) -> bool:
  """Whether the source holds decoded images of exactly this size and channel count (gathered per batch)."""
  return source.arrays is not None and source.arrays[0].shape[1:] == (image_size, image_size, channels)


def auto_workers() -> int:
  """Decoding worker processes when none are configured: one per core this process may use."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return min(MAX_AUTO_WORKERS, cores)


def check_worker_count(worker_count: Optional[int]) -> None:
  """Raises ValueError unless worker_count is None (one per core), 0 (decode in this process) or a count."""
  if worker_count is not None and (isinstance(worker_count, bool) or not isinstance(worker_count, int)
                                   or worker_count < 0):
    raise ValueError(f"worker_count={worker_count!r} is invalid: use None (one decoding process per core), 0 "
                     "(decode in the training process) or a number of worker processes")


def batch_dataset(source: Source, *, seed: int, global_batch: int, image_size: int, channels: int = 3,
                  random_flip: bool = True, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Step -> this process's (images, labels) rows of that step's global batch, as a Grain MapDataset."""
  if channels not in (1, 3):
    raise ValueError(f"channels={channels!r} is invalid: use 1 (grayscale) or 3 (RGB)")
  if image_size < 1:
    raise ValueError(f"image_size={image_size!r} is invalid: it must be a positive integer")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} is not divisible by the {process_count} processes: "
                     f"use a multiple of {process_count}")
  local = global_batch // process_count
  if in_memory(source, image_size, channels):
    ds = grain.MapDataset.range(STREAM_LENGTH // local).map(
        functools.partial(_gather, source.arrays, source.size, seed, random_flip, local))
  else:
    ds = grain.MapDataset.range(STREAM_LENGTH).map(functools.partial(_record_at, source.size, seed, random_flip))
    ds = ds.map(functools.partial(_prepare, source, image_size, channels)).batch(local)
  return ds[process_index::process_count]


def batch_stream(source: Source, *, seed: int, global_batch: int, image_size: int, channels: int = 3,
                 random_flip: bool = True, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                 labels: bool = False, worker_count: Optional[int] = None) -> Iterator[Any]:
  """Endless float32 batches [global_batch / process_count, size, size, channels] (with `labels`, pairs
  (images, int32 labels)) from start_step: this process's rows of each global batch. Files are decoded in
  `worker_count` Grain worker processes (None: auto_workers(); 0: in this process); in-memory images at the
  target size are gathered per batch in a reading thread."""
  if labels and not source.num_classes:
    raise ValueError("the dataset has no class labels: a class-conditional model needs a labelled dataset (the "
                     "digits, a TFDS dataset with a 'label' feature, or a folder of one subfolder per class)")
  check_worker_count(worker_count)
  ds = batch_dataset(source, seed=seed, global_batch=global_batch, image_size=image_size, channels=channels,
                     random_flip=random_flip, process_index=process_index, process_count=process_count)
  ds = ds[start_step:]
  if not labels:
    ds = ds.map(_images_only)
  workers = 0 if in_memory(source, image_size, channels) else (auto_workers() if worker_count is None else worker_count)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 2, prefetch_buffer_size=4))
  if workers:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; a program without absl never parsed them
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                                  worker_init_fn=_leave_signals_to_the_main_process)
    return _closing(iter(iter_ds), _out_of_shared_memory)
  return _closing(iter(iter_ds))


def _leave_signals_to_the_main_process(worker_index: int, worker_count: int) -> None:
  """Grain's worker_init_fn: SIGINT left to the main process (runtime.leave_signals_to_the_main_process), for any
  program; SIGTERM too only where train.py or sample.py is the main program (they close their streams before exit)."""
  del worker_index, worker_count
  runtime.leave_signals_to_the_main_process((signal.SIGINT,))


def _images_only(batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """The images of an (images, labels) batch."""
  return batch[0]


def _out_of_shared_memory(batch: Any) -> Any:
  """A batch from Grain's worker processes copied out of their shared memory, which a batch must not hold on to: on
  the CPU, jax.device_put keeps the NumPy buffer it was given, and shared memory still held at exit is never
  unlinked (Python's resource tracker then reports it leaked)."""
  return tuple(map(np.array, batch)) if isinstance(batch, tuple) else np.array(batch)


def _closing(iterator: Iterator[Any], take: Callable[[Any], Any] = lambda batch: batch) -> Iterator[Any]:
  """Yields take(batch) for each batch of a Grain iterator and closes it (and its worker processes) when the stream
  is dropped."""
  try:
    for batch in iterator:
      yield take(batch)
  finally:
    close = getattr(iterator, "close", None)
    if close:
      close()
