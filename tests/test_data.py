"""Input pipelines: shapes and ranges, preprocessing geometry, folders, labels, determinism, resume, sharding, workers,
errors."""

import errno
import logging
import os
import re
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ddpm_jax import data


def take(it, n):
  return [next(it) for _ in range(n)]


def array_source(images):
  return data.array_source(images)


@pytest.mark.parametrize("name, size", [("cifar10", 32), ("oxford_flowers102", 64)])
def test_tfds_batches_have_the_configured_shape_dtype_and_range(name, size):
  with tfds.testing.mock_data(num_examples=20):
    source = data.make_source(f"tfds:{name}")
    (batch,) = take(data.batch_stream(source, seed=0, global_batch=8, image_size=size, worker_count=0), 1)
  assert source.num_classes == {"cifar10": 10, "oxford_flowers102": 102}[name]
  assert batch.shape == (8, size, size, 3) and batch.dtype == np.float32
  assert batch.min() >= -1.0 and batch.max() <= 1.0 and batch.std() > 0.1


def test_flip_happens_on_about_half_the_images():
  img = np.zeros((400, 8, 8, 1), np.uint8)
  img[:, :, :4] = 255  # bright left half
  (batch,) = take(data.batch_stream(array_source(img), seed=3, global_batch=400, image_size=8, channels=1), 1)
  flipped = (batch[:, :, :4].mean((1, 2, 3)) < 0).mean()
  # Binomial(400, 0.5): s.d. of the fraction is 0.025; allow 4 s.d.
  assert abs(flipped - 0.5) < 0.1
  (kept,) = take(data.batch_stream(array_source(img), seed=3, global_batch=400, image_size=8, channels=1,
                                   random_flip=False), 1)
  assert (kept[:, :, :4] > 0.99).all()


def test_resize_short_side_then_center_crop_keeps_the_center():
  rows, cols = np.meshgrid(np.arange(48), np.arange(32), indexing="ij")
  ramp = (2 * rows + cols).astype(np.uint8)[None, :, :, None]  # a linear ramp, 48x32
  (batch,) = take(data.batch_stream(array_source(ramp), seed=0, global_batch=1, image_size=16, channels=1,
                                    random_flip=False, worker_count=0), 1)
  out = (batch[0, :, :, 0] + 1) * 127.5
  # Short side 32 -> 16 halves both axes (24x16); the crop drops 4 rows top and bottom. Output pixel (i, j)
  # samples the input at (2(i+4) + 0.5, 2j + 0.5), where the ramp is 2·row + col; columns 0 and 15 touch
  # the border, where the antialiasing filter is clamped.
  i, j = np.meshgrid(np.arange(16), np.arange(1, 15), indexing="ij")
  np.testing.assert_allclose(out[:, 1:15], 2 * (2 * (i + 4) + 0.5) + (2 * j + 0.5), atol=0.01)


def _write_folder(root):
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "nested", "deeper"))
  for k in range(5):
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(os.path.join(root, f"rgb{k}.png"))
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(root, "nested", "a.jpg"))
  Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(
      os.path.join(root, "nested", "deeper", "gray.png"))
  with open(os.path.join(root, "nested", "corrupt.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\nthis is not a png")
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not an image")


def test_image_folder_skips_a_corrupt_file_when_read_with_one_warning(tmp_path, caplog):
  _write_folder(str(tmp_path))
  source = data.make_source(f"folder:{tmp_path}")
  assert source.size == 8  # every .png/.jpg listed; none opened yet
  with caplog.at_level(logging.WARNING):
    # Three epochs of one batch each, the grayscale file expanded to RGB; the corrupt file (listed between
    # nested/a.jpg and nested/deeper/gray.png) read as the next file of the listing, the grayscale one.
    for batch in take(data.batch_stream(source, seed=1, global_batch=8, image_size=16, worker_count=0), 3):
      assert batch.shape == (8, 16, 16, 3) and -1 <= batch.min() and batch.max() <= 1
      assert sum(np.allclose(im[..., 0], im[..., 1]) and np.allclose(im[..., 1], im[..., 2]) for im in batch) == 2
  warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith(f"skipped {tmp_path / 'nested' / 'corrupt.png'}, "), warnings
  gray = take(data.batch_stream(source, seed=1, global_batch=7, image_size=16, channels=1, worker_count=0), 1)[0]
  assert gray.shape == (7, 16, 16, 1)
  assert source.num_classes == 0  # images at the top level: not one subfolder per class
  with pytest.raises(ValueError, match="the dataset has no class labels"):
    data.batch_stream(source, seed=1, global_batch=7, image_size=16, labels=True)


def test_a_tiff_named_png_is_read_as_the_image_it_holds(tmp_path):
  # PIL decodes by content, not by name: the file the old decoder failed on mid-run is an image like any other.
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "disguised.png", format="TIFF")
  assert open(tmp_path / "disguised.png", "rb").read(2) in (b"II", b"MM")  # a TIFF header
  source = data.make_source(f"folder:{tmp_path}")
  assert source.size == 1
  batch = take(data.batch_stream(source, seed=0, global_batch=1, image_size=16, random_flip=False, worker_count=0),
               1)[0]
  np.testing.assert_allclose(batch[0], pixels / 127.5 - 1, atol=1e-6)


def test_decoding_in_worker_processes_gives_the_same_batches(tmp_path):
  _write_folder(str(tmp_path))
  source = data.make_source(f"folder:{tmp_path}")
  kw = dict(seed=3, global_batch=4, image_size=12, start_step=2)
  here = take(data.batch_stream(source, worker_count=0, **kw), 4)
  for a, b in zip(here, take(data.batch_stream(source, worker_count=2, **kw), 4)):
    np.testing.assert_array_equal(a, b)
    # copied out of the workers' shared memory: a batch that jax.device_put keeps (on the CPU it aliases the NumPy
    # buffer) would keep the shared memory past exit, never unlinked ("leaked shared_memory objects")
    assert type(b) is np.ndarray and b.flags.owndata, (type(b), b.base)


def test_a_folder_of_class_subfolders_is_labelled_in_sorted_order(tmp_path):
  # Class k's images are filled with the value 40 k (some nested one level deeper), so a label can be checked
  # against its image.
  for k, name in enumerate(["cat", "bird", "zebra"]):
    for j in range(3):
      folder = tmp_path / name / ("deep" if j == 2 else "")
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((10, 10), 40 * k, np.uint8)).save(folder / f"{j}.png")
  source = data.make_source(f"folder:{tmp_path}")
  assert source.class_names == ("bird", "cat", "zebra")
  images, labels = next(data.batch_stream(source, seed=0, global_batch=9, image_size=10, channels=1, labels=True,
                                          worker_count=0))
  value_of_class = {0: 40, 1: 0, 2: 80}  # bird was written with k = 1, cat with 0, zebra with 2
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and labels.dtype == np.int32
  np.testing.assert_allclose((images[:, 0, 0, 0] + 1) * 127.5, [value_of_class[y] for y in labels], atol=1e-4)


def test_unreadable_files_are_vetted_only_when_read_each_named_once_and_counted(tmp_path, caplog, monkeypatch):
  # One good image among files that cannot be read: damaged, a FIFO (opening it would block for ever), and a file
  # deleted after the listing. The good one stands in for every other; a folder named like an image is not listed.
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "good.png")
  for k in range(3):
    (tmp_path / f"bad{k}.png").write_bytes(b"not a png")
  os.mkfifo(tmp_path / "fifo.png")
  (tmp_path / "folder.png").mkdir()
  (tmp_path / "gone.png").write_bytes(b"deleted below")
  opened = []
  # (paths of this folder only: an earlier test's stream, closed, can still be decoding what it read ahead in
  # Grain's prefetch threads, which Grain's close does not wait for)
  monkeypatch.setattr(data, "decode_file", lambda path, real=data.decode_file: (
      path.startswith(str(tmp_path)) and opened.append(path)) or real(path))
  source = data.make_source(f"folder:{tmp_path}")
  assert source.size == 6 and opened == []  # the start lists, and opens nothing
  (tmp_path / "gone.png").unlink()
  result = []
  with caplog.at_level(logging.WARNING):
    reader = threading.Thread(target=lambda: result.append(take(data.batch_stream(
        source, seed=0, global_batch=6, image_size=8, channels=1, worker_count=0), 2)), daemon=True)
    reader.start()
    reader.join(timeout=60)
  if not result:  # a reader blocked in opening the FIFO: a writer's open frees it, so the test process can end
    os.close(os.open(tmp_path / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
  assert result, "reading the folder blocked (the FIFO opened?)"
  for batch in result[0]:
    np.testing.assert_allclose(batch, 200 / 127.5 - 1, atol=1e-6)  # every record: the good image
  warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
  named = sorted(re.match(r"skipped (\S+), ", w).group(1) for w in warnings)
  assert named == [str(tmp_path / f) for f in ("bad0.png", "bad1.png", "bad2.png", "fifo.png", "gone.png")]
  assert [int(re.search(r"; (\d+) file\(s\)", w).group(1)) for w in warnings] == [1, 2, 3, 4, 5]  # each once
  assert "not a regular file" in next(w for w in warnings if "fifo.png" in w)


def test_a_read_error_that_may_pass_is_raised_not_skipped(tmp_path, monkeypatch):
  # EIO, ESTALE, too many open files: skipping would silently train on other images than the seed chose.
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
  source = data.make_source(f"folder:{tmp_path}")

  def flaky(path):
    raise OSError(errno.EIO, "Input/output error", path)

  monkeypatch.setattr(data, "decode_file", flaky)
  with pytest.raises(OSError, match="Input/output error"):
    source.read(0)


def test_a_folder_of_nothing_readable_fails_when_read_with_one_line(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"not a png")
  source = data.make_source(f"folder:{tmp_path}")
  with pytest.raises(ValueError, match=f"^dataset folder '{tmp_path}' holds no readable images: all 1 listed files"):
    next(data.batch_stream(source, seed=0, global_batch=1, image_size=8, worker_count=0))


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
  wide = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
  Image.fromarray(wide).save(tmp_path / "deep.png")
  assert Image.open(tmp_path / "deep.png").mode in data.WIDE_GRAY_MODES  # PIL reads it as 16-bit gray
  np.testing.assert_array_equal(data.decode_file(str(tmp_path / "deep.png"))[..., 0],
                                np.round(wide.astype(np.float64) / 257).astype(np.uint8))


def test_a_folder_source_reads_the_listing_it_is_given_and_training_takes_process_0s(tmp_path, monkeypatch):
  for k, name in enumerate(("a.png", "b.png", "c.png")):
    Image.fromarray(np.full((4, 4), 50 * (k + 1), np.uint8)).save(tmp_path / name)  # a: 50, b: 100, c: 150
  # Another process listed b.png and c.png only (a listing that differs between hosts): this one reads those.
  source = data.folder_source(str(tmp_path), ["b.png", "c.png"])
  assert source.size == 2 and [int(source.read(i)[0][0, 0, 0]) for i in (0, 1)] == [100, 150]
  assert source.identity["listing_sha256"] != data.folder_source(str(tmp_path)).identity["listing_sha256"]
  for listing in (["x/1.png", "y z/2.png"], []):
    assert data.unpack_listing(data.pack_listing(listing)) == listing
  with pytest.raises(ValueError, match="holds no images: the listing given is empty$"):
    data.folder_source(str(tmp_path), [])
  with pytest.raises(ValueError, match="does not exist or is not a folder$"):
    data.folder_source(str(tmp_path / "unmounted"), ["b.png"])
  # build_source asks the coordination service for process 0's listing (consensus.decide): it is used as answered.
  from ddpm_jax import builders, consensus  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(consensus, "decide", lambda name, fn: data.pack_listing(["c.png"]))
  config = default.get_config()
  config.dataset = f"folder:{tmp_path}"
  assert builders.build_source(config).size == 1


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"holds no images: expected files ending in \.png, \.jpg, \.jpeg$"):
    data.make_source(f"folder:{tmp_path}")
  with pytest.raises(ValueError, match="does not exist or is not a folder$"):
    data.make_source(f"folder:{tmp_path}/missing")


def test_digits_load_offline():
  digits = data.load_digits()[0]
  assert digits.shape == (1797, 8, 8, 1) and digits.dtype == np.uint8 and digits.max() == 255
  source = data.make_source("digits")
  assert source.size == 1797
  (batch,) = take(data.batch_stream(source, seed=0, global_batch=1797, image_size=8, channels=1,
                                    random_flip=False), 1)
  assert batch.min() == -1.0 and batch.max() == 1.0
  # One full epoch at the native size is a permutation of the whole set, scaled exactly.
  want = np.sort((digits.reshape(1797, -1) / 127.5 - 1).astype(np.float32), axis=0)
  np.testing.assert_allclose(np.sort(batch.reshape(1797, -1), axis=0), want, atol=1e-6)


def stream(seed, start_step=0):
  return data.batch_stream(data.make_source("digits"), seed=seed, global_batch=64, image_size=8, channels=1,
                           start_step=start_step)


def test_order_is_seeded_and_resume_continues_the_straight_run():
  straight = take(stream(0), 32)  # 32 x 64 = 2,048 > 1,797: crosses into the second epoch
  again = take(stream(0), 3)
  other = take(stream(1), 3)
  for a, b in zip(again, straight):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(other[0], straight[0])
  for n in (1, 27, 28, 29):  # 28 x 64 = 1,792: batch 28 straddles the epoch boundary
    resumed = take(stream(0, start_step=n), 32 - n)
    for a, b in zip(resumed, straight[n:]):
      np.testing.assert_array_equal(a, b)
  # Each epoch visits every record once, the second in another order than the first (labels name the records).
  source = data.array_source(np.zeros((128, 8, 8, 1), np.uint8), np.arange(128),
                             class_names=[str(k) for k in range(128)])
  order = np.concatenate([y for _, y in take(data.batch_stream(source, seed=0, global_batch=64, image_size=8,
                                                               channels=1, labels=True), 4)])
  first, second = order[:128], order[128:]
  assert sorted(first) == sorted(second) == list(range(128))
  assert not np.array_equal(first, second)


def test_two_processes_read_disjoint_halves_of_each_global_batch():
  # Labels are the record indices, so the labels stream names the records each process reads.
  n, steps = 1000, 1000 // 64  # whole global batches inside the first epoch
  source = data.array_source(np.zeros((n, 8, 8, 1), np.uint8), np.arange(n), class_names=[str(k) for k in range(n)])
  records = lambda p, count: [y for _, y in take(data.batch_stream(source, seed=5, global_batch=64, image_size=8,
                                                                   channels=1, labels=True, process_index=p,
                                                                   process_count=count), steps)]
  halves = [np.concatenate(records(p, 2)) for p in (0, 1)]
  assert not set(halves[0]) & set(halves[1])
  assert len(set(halves[0]) | set(halves[1])) == 64 * steps
  # Together they form exactly the single-process stream, batch by batch.
  single = records(0, 1)
  for s in range(steps):
    np.testing.assert_array_equal(single[s], np.concatenate([halves[0][32 * s:32 * (s + 1)],
                                                             halves[1][32 * s:32 * (s + 1)]]))


def test_digits_are_scikit_learns_read_without_importing_sklearn_datasets():
  import sklearn.datasets  # pylint: disable=g-import-not-at-top

  images, labels = data.load_digits()
  bunch = sklearn.datasets.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
  np.testing.assert_array_equal(images[..., 0], np.round(bunch.images * 255 / 16).astype(np.uint8))
  np.testing.assert_array_equal(labels, bunch.target)


def test_digit_labels_belong_to_their_images():
  images, labels = data.load_digits()
  batch, got = next(data.batch_stream(data.make_source("digits"), seed=1, global_batch=256, image_size=8,
                                      channels=1, random_flip=False, labels=True))
  pixels = {im.tobytes(): y for im, y in zip(images, labels)}
  assert [pixels[np.round((im + 1) * 127.5).astype(np.uint8).tobytes()] for im in batch] == got.tolist()


def test_two_process_batches_concatenate_to_the_single_process_batch():
  source = data.make_source("digits")
  kw = dict(seed=2, global_batch=64, image_size=8, channels=1, start_step=27)
  single = take(data.batch_stream(source, **kw), 2)
  parts = [take(data.batch_stream(source, process_index=p, process_count=2, **kw), 2)
           for p in (0, 1)]
  for s in range(2):
    np.testing.assert_array_equal(np.concatenate([parts[0][s], parts[1][s]]), single[s])


def test_unknown_or_unprepared_tfds_dataset_fails_fast(tmp_path):
  start = time.time()
  with pytest.raises(ValueError, match="^unknown TFDS dataset 'cifar11'"):
    data.make_source("tfds:cifar11")
  with pytest.raises(ValueError, match=re.escape(f"TFDS dataset 'cifar10' is not prepared as ArrayRecord in "
                                                 f"{tmp_path}: prepare it once with `pip install -r "
                                                 "requirements-prepare.txt && tfds build cifar10 "
                                                 "--file_format=array_record --data_dir=DIR`")):
    data.make_source("tfds:cifar10", data_dir=str(tmp_path))
  assert time.time() - start < 10


@pytest.mark.parametrize("spec", ["mnist", "tfds:", "folder:", "http://x"])
def test_bad_dataset_strings(spec):
  with pytest.raises(ValueError, match="is not understood: use 'digits', 'tfds:<name>'"):
    data.parse_dataset(spec)


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match=re.escape("batch_size=10 is not divisible by the 4 processes")):
    data.batch_stream(data.make_source("digits"), seed=0, global_batch=10, image_size=8, process_count=4)


@pytest.mark.parametrize("random_flip", [False, True])
def test_in_memory_digits_are_gathered_per_batch_and_give_the_same_batches(monkeypatch, random_flip):
  source = data.make_source("digits")
  kw = dict(seed=4, global_batch=64, image_size=8, channels=1, random_flip=random_flip, start_step=27,
            process_index=1, process_count=2, worker_count=0)
  assert data.in_memory(source, 8, 1) and not data.in_memory(source, 16, 1) and not data.in_memory(source, 8, 3)
  fast = take(data.batch_stream(source, **kw), 3)
  assert all(isinstance(b, np.ndarray) and b.shape == (32, 8, 8, 1) for b in fast)
  monkeypatch.setattr(data, "in_memory", lambda *args: False)  # read and preprocessed per image, as files are
  for a, b in zip(fast, take(data.batch_stream(source, **kw), 3)):
    np.testing.assert_array_equal(a, b)


def test_past_a_hundred_unreadable_files_warnings_are_sampled(tmp_path, caplog):
  # A folder that vanishes mid-run (a lost mount) must not flood the log with a line per file before it fails.
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "z.png")  # listed last: it stands in for all the rest
  for k in range(150):
    (tmp_path / f"bad{k:03d}.png").write_bytes(b"not a png")
  source = data.make_source(f"folder:{tmp_path}")
  with caplog.at_level(logging.WARNING):
    take(data.batch_stream(source, seed=0, global_batch=151, image_size=4, channels=1, worker_count=0), 1)
  counts = [int(re.search(r"; (\d+) file\(s\)", r.getMessage()).group(1)) for r in caplog.records
            if "cannot be read" in r.getMessage()]
  assert counts == list(range(1, data.NAMED_SKIPS + 1))  # the first 100 named; the next at the 1,000th
