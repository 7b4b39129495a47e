"""Tests for ddpm_jax.images: nearest-neighbour upscaling, bordered grids and labelled figures."""

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images

BG = images.BACKGROUND


def tiles(rows: int, cols: int, h: int = 8, w: int = 8, c: int = 1, seed: int = 0) -> np.ndarray:
  """Random uint8 tiles [rows, cols, h, w, c] in 0..200, so no tile pixel equals the white background."""
  return np.random.default_rng(seed).integers(0, 201, (rows, cols, h, w, c), dtype=np.uint8)


def ink(region: np.ndarray) -> np.ndarray:
  """Mask of dark text pixels (darker than mid-grey) of an [H, W, C] region."""
  return (region < 128).any(axis=-1)


def drawn(region: np.ndarray) -> np.ndarray:
  """Mask of non-background pixels (text with its anti-aliased edges) of an [H, W, C] region."""
  return (region != BG).any(axis=-1)


@pytest.mark.parametrize("hw,scale", [((8, 8), 8), ((28, 28), 3), ((32, 32), 2), ((64, 64), 1), ((100, 50), 2),
                                      ((5, 7), 13), ((7, 5), 13)])
def test_auto_scale_is_the_smallest_factor_reaching_64(hw, scale):
  assert images.auto_scale(*hw) == scale
  assert min(hw) * scale >= 64 and (scale == 1 or min(hw) * (scale - 1) < 64)


def test_upscale_turns_each_pixel_into_a_scale_by_scale_block():
  src = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 2), dtype=np.uint8)
  up = images.upscale_nearest(src)  # auto: ceil(64 / 5) = 13
  assert up.shape == (3, 65, 91, 2) and up.dtype == np.uint8
  for i in range(5):
    for j in range(7):
      block = up[:, 13 * i:13 * (i + 1), 13 * j:13 * (j + 1)]
      assert (block == src[:, i, j][:, None, None]).all(), (i, j)
  assert images.upscale_nearest(src, 1) is src
  with pytest.raises(ValueError, match="scale"):
    images.upscale_nearest(src, 0)


def test_make_grid_places_tiles_between_background_borders():
  t = tiles(2, 3, h=4, w=5, c=3)
  grid = images.make_grid(t, scale=2, pad=2)
  h, w = 8, 10
  assert grid.shape == (2 * (h + 2) + 2, 3 * (w + 2) + 2, 3)
  covered = np.zeros(grid.shape[:2], bool)
  for r in range(2):
    for c in range(3):
      y, x = 2 + r * (h + 2), 2 + c * (w + 2)
      assert (grid[y:y + h, x:x + w] == images.upscale_nearest(t[r, c], 2)).all(), (r, c)
      covered[y:y + h, x:x + w] = True
  assert (grid[~covered] == BG).all()
  assert (images.make_grid(t.reshape((6, 4, 5, 3)), cols=3, scale=2) == grid).all()
  partial = images.make_grid(t.reshape((6, 4, 5, 3))[:5], cols=3, scale=1)
  assert (partial[8:12, 16:21] == BG).all()  # the sixth cell is empty


def test_save_samples_writes_an_upscaled_grid_and_the_original_array(tmp_path):
  x = np.random.default_rng(2).uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
  png, npz = images.save_samples(str(tmp_path / "s.png"), x, cols=5)
  with Image.open(png) as im:
    assert im.size == (5 * 66 + 2, 2 * 66 + 2) and im.mode == "L"
  assert (np.load(npz)["images"] == images.to_uint8(x)).all()


def check_figure(fig, layout, t, title, col_labels, row_labels):
  """Asserts the figure's size, tiles, label ink and background against geometry computed here."""
  rows, cols, h, w, _ = t.shape
  s = images.auto_scale(h, w)
  th, tw, pad, m = h * s, w * s, 2, 6
  band = images.load_font(images.FONT_SIZE).getbbox("Agjy|(")[3] + 2 * m
  grid_h, grid_w = rows * (th + pad) + pad, cols * (tw + pad) + pad
  label_w = layout.row_label_boxes[0][2] - layout.row_label_boxes[0][0] if row_labels else 0
  top = m + band * (bool(title) + bool(col_labels))
  assert min(th, tw) >= 64
  assert fig.shape == (top + grid_h + m, m + label_w + grid_w + m, t.shape[-1]) == (layout.height, layout.width,
                                                                                      t.shape[-1])
  assert (layout.grid_top, layout.grid_left, layout.scale) == (top, m + label_w, s)
  # Tiles land where the geometry says, enlarged by nearest neighbour; everything else in the grid is border.
  grid = fig[top:top + grid_h, m + label_w:m + label_w + grid_w]
  covered = np.zeros(grid.shape[:2], bool)
  for r in range(rows):
    for c in range(cols):
      y, x = pad + r * (th + pad), pad + c * (tw + pad)
      assert layout.tile_box(r, c) == (m + label_w + x, top + y, m + label_w + x + tw, top + y + th)
      assert (grid[y:y + th, x:x + tw] == images.upscale_nearest(t[r, c], s)).all(), (r, c)
      covered[y:y + th, x:x + tw] = True
  assert (grid[~covered] == BG).all()
  # Margins are background.
  for margin in (fig[:m], fig[-m:], fig[:, :m], fig[:, -m:]):
    assert (margin == BG).all()
  # The title band has ink, centred on the figure.
  if title:
    band_px = fig[m:m + band]
    ys, xs = np.nonzero(ink(band_px))
    assert xs.size > 50 and abs(xs.mean() - fig.shape[1] / 2) < 0.1 * fig.shape[1]
  # Each column header has ink centred over its column, and the band between headers is background.
  if col_labels:
    y0 = m + band * bool(title)
    header = fig[y0:y0 + band]
    free = np.ones(fig.shape[1], bool)
    for c in range(cols):
      centre = m + label_w + pad + c * (tw + pad) + tw / 2
      x0, x1 = int(centre - tw / 2), int(centre + tw / 2)
      assert layout.col_label_boxes[c] == (x0, y0, x1, y0 + band)
      assert ink(header[:, x0:x1]).sum() > 20, f"no header over column {c}"
      _, xs = np.nonzero(drawn(header[:, x0:x1]))
      assert abs(x0 + (xs.min() + xs.max()) / 2 - centre) <= 2, c
      free[x0 + xs.min():x0 + xs.max() + 1] = False
    assert (header[:, free] == BG).all()
  if row_labels:
    for r in range(rows):
      x0, y0, x1, y1 = layout.row_label_boxes[r]
      assert (x0, x1) == (m, m + label_w) and (y0, y1) == (top + pad + r * (th + pad), top + pad + r * (th + pad) + th)
      assert ink(fig[y0:y1, x0:x1]).sum() > 20, f"no label beside row {r}"


def test_forward_diffusion_figure_has_its_title_and_headers_where_the_geometry_says(tmp_path):
  t = tiles(4, 6)
  title, labels = "Forward diffusion q(x_t | x_0)", [f"t = {s}" for s in (0, 199, 399, 599, 799, 999)]
  fig, layout = images.labelled_figure(t, title=title, col_labels=labels)
  assert fig.dtype == np.uint8 and fig.shape[-1] == 1
  check_figure(fig, layout, t, title, labels, None)
  images.save_png(str(tmp_path / "f.png"), fig)
  with Image.open(tmp_path / "f.png") as im:
    assert im.size == (layout.width, layout.height) == (410, 62 + 266 + 6)


def test_ten_samples_figure_from_a_flat_batch_with_title_only():
  flat = tiles(2, 5, seed=3).reshape((10, 8, 8, 1))
  fig, layout = images.labelled_figure(flat, cols=5, title="Ten samples")
  check_figure(fig, layout, flat.reshape((2, 5, 8, 8, 1)), "Ten samples", None, None)
  assert layout.col_label_boxes == () and layout.row_label_boxes == ()


def test_rgb_trajectory_figure_with_row_labels_and_a_wide_title():
  t = tiles(4, 5, h=16, w=16, c=3, seed=4)
  labels = [f"t = {s}" for s in (800, 600, 400, 200, 0)]
  fig, layout = images.labelled_figure(t, title="Denoising trajectory", col_labels=labels,
                                       row_labels=[f"sample {i}" for i in range(4)])
  assert fig.shape[-1] == 3
  check_figure(fig, layout, t, "Denoising trajectory", labels, [0] * 4)
  text = fig[:layout.grid_top][drawn(fig[:layout.grid_top])]
  assert (text == text[:, :1]).all() and (text == 0).all(axis=-1).any()  # black, grey-edged text
  # A title wider than the grid widens the figure and keeps the grid centred.
  narrow, lay = images.labelled_figure(tiles(1, 1), title="a title much wider than one 64-pixel tile")
  assert lay.width > 6 + 66 + 6 and abs((lay.grid_left + lay.grid_w / 2) - lay.width / 2) <= 1
  assert ink(narrow[lay.title_box[1]:lay.title_box[3]]).any()


def test_labelled_figure_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    images.labelled_figure(np.zeros((1, 2, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="2 column labels for 3 columns"):
    images.labelled_figure(tiles(1, 3), col_labels=["a", "b"])
