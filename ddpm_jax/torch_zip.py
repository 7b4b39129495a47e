"""PyTorch's torch.save files (a zip of a pickle and raw storages) read as NumPy arrays, without PyTorch.

The pickle is read by an unpickler that admits only what a state dict of
tensors holds: tensor storages, torch._utils._rebuild_tensor_v2 and plain
containers. Any other name the file asks for is refused before it is looked
up, so no code from the file runs.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

# torch's storage classes -> the NumPy dtype of their elements
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _Storage:
  """A storage class named by the pickle: only its element dtype."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2's meaning: the strided view of a storage, copied; ValueError when the view
  would reach outside the storage."""
  size, stride = tuple(size), tuple(stride)
  numbers = (offset,) + size + stride
  if (not isinstance(storage, np.ndarray) or len(size) != len(stride)
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)):
    raise ValueError(f"a tensor record is malformed (offset {offset!r}, size {size!r}, stride {stride!r})")
  if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise ValueError(f"a tensor of size {size} with stride {stride} at offset {offset} reaches past its storage of "
                     f"{storage.size} elements")
  if not math.prod(size):
    return np.zeros(size, storage.dtype)
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride), writeable=False)
  return np.array(view)


class _Unpickler(pickle.Unpickler):
  """Admits tensor storages, the tensor rebuild function and OrderedDict; refuses every other name."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name in STORAGE_DTYPES:
      return _Storage(STORAGE_DTYPES[name])
    raise ValueError(f"the file's pickle names {module}.{name}, which a state dict of tensors does not hold: "
                     "refused (only tensor storages, torch._utils._rebuild_tensor_v2 and OrderedDict are read)")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
            and isinstance(pid[2], str) and isinstance(pid[4], int)):
      raise ValueError(f"the file's pickle refers to {pid!r}, which is not a tensor storage")
    dtype, key, numel = pid[1].dtype, pid[2], pid[4]
    try:
      raw = self._archive.read(f"{self._prefix}data/{key}")
    except KeyError:
      raise ValueError(f"storage {key!r} named by the pickle is missing from the file") from None
    if len(raw) < numel * dtype.itemsize:
      raise ValueError(f"storage {key!r} holds {len(raw)} bytes, fewer than its {numel} elements of {dtype} need")
    return np.frombuffer(raw, dtype, numel)


def load(path: str) -> dict[str, np.ndarray]:
  """The name -> array state dict a torch.save zip file holds; ValueError (one line) for anything else."""
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise ValueError(f"{path} is not a torch.save file: it holds no single <name>/data.pkl")
      prefix = pickles[0][:-len("data.pkl")]
      if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder").strip() != b"little":
        raise ValueError(f"{path} was written on a big-endian machine: only little-endian files are read")
      state = _Unpickler(archive.read(pickles[0]), archive, prefix).load()
  except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, OSError, TypeError, AttributeError,
          IndexError, KeyError) as e:  # a damaged pickle can fail in any of these ways
    raise ValueError(f"{path} cannot be read as a torch.save file (damaged or truncated?): {e}") from None
  if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in state.items()):
    raise ValueError(f"{path} does not hold a state dict (names -> tensors)")
  return dict(state)
