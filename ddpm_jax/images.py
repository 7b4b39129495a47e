"""Image output: [-1, 1] floats to uint8, upscaled bordered grids, labelled figures, PNG and npz files."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 in 0..255, rounded and clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


MIN_SIDE = 64  # pixels: smaller images are enlarged to at least this per side
BACKGROUND = 255  # white figure background and tile borders
INK = 0  # black text
FONT_SIZE = 13  # pixels; Pillow's built-in Aileron font


def auto_scale(height: int, width: int, min_side: int = MIN_SIDE) -> int:
  """The smallest integer factor that makes both sides at least min_side pixels (1 when they already are)."""
  return max(1, math.ceil(min_side / max(1, min(height, width))))


def upscale_nearest(images: np.ndarray, scale: Optional[int] = None) -> np.ndarray:
  """Nearest-neighbour enlargement of [..., H, W, C] by an integer factor (None: auto_scale(H, W))."""
  images = np.asarray(images)
  if scale is None:
    scale = auto_scale(images.shape[-3], images.shape[-2])
  if int(scale) != scale or scale < 1:
    raise ValueError(f"scale={scale!r} is invalid: it must be an integer >= 1")
  scale = int(scale)
  return images if scale == 1 else images.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _as_tiles(images: np.ndarray, cols: Optional[int]) -> tuple[np.ndarray, int, int]:
  """[rows, cols, H, W, C] or [N, H, W, C] (+ cols, default ceil(sqrt N)) -> ([N, H, W, C], rows, cols)."""
  images = np.asarray(images)
  if images.ndim == 5:
    if cols is not None and cols != images.shape[1]:
      raise ValueError(f"cols={cols} contradicts the [rows, cols, H, W, C] shape {images.shape}")
    rows, cols = images.shape[:2]
    return images.reshape((-1,) + images.shape[2:]), rows, cols
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, C] or [rows, cols, H, W, C] with C = 1 or 3, got {images.shape}")
  n = len(images)
  cols = cols or math.ceil(math.sqrt(n))
  return images, math.ceil(n / cols), cols


def make_grid(images: np.ndarray, cols: Optional[int] = None, pad: int = 2, pad_value: int = BACKGROUND,
              scale: Optional[int] = 1) -> np.ndarray:
  """uint8 [N, H, W, C] (row-major, `cols` per row) or [rows, cols, H, W, C] -> one bordered uint8 grid image.

  Tiles are first enlarged by `scale` (None: auto_scale; 1: as they are) to h x w; tile (r, c) then occupies
  rows pad + r·(h+pad) .. +h and columns pad + c·(w+pad) .. +w of a [rows·(h+pad)+pad, cols·(w+pad)+pad, C]
  image whose `pad`-pixel borders and empty cells are pad_value.
  """
  flat, rows, cols = _as_tiles(images, cols)
  flat = upscale_nearest(flat, scale)
  n, h, w, c = flat.shape
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for k, image in enumerate(flat):
    r, q = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
  return grid


@functools.lru_cache(maxsize=None)
def load_font(size: int = FONT_SIZE):
  """Pillow's built-in font at `size` pixels (no font file needed); the fixed-size bitmap font without FreeType."""
  try:
    return ImageFont.load_default(size=size)
  except ImportError:  # Pillow built without FreeType
    return ImageFont.load_default()


Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive: the pixels figure[y0:y1, x0:x1]


@dataclasses.dataclass(frozen=True)
class FigureLayout:
  """Pixel geometry of a labelled figure; every box is (x0, y0, x1, y1) with figure[y0:y1, x0:x1] its pixels.

  The bordered grid (make_grid's output, its outer `pad` border included) sits at (grid_left, grid_top); tile
  (r, c) is tile_box(r, c). The title is centred in title_box, a band over the full width. Column c's header
  is centred on the column's centre x in col_label_boxes[c], which spans that tile column's x range (a header
  wider than a tile overflows it) and the header band; row r's label is centred in row_label_boxes[r], the
  left band beside that row of tiles. Absent labels have None / empty tuples and take no space.
  """

  height: int
  width: int
  rows: int
  cols: int
  tile_h: int  # after upscaling
  tile_w: int
  scale: int
  pad: int
  margin: int
  grid_top: int
  grid_left: int
  grid_h: int
  grid_w: int
  title_box: Optional[Box]
  col_label_boxes: tuple[Box, ...]
  row_label_boxes: tuple[Box, ...]

  def tile_box(self, r: int, c: int) -> Box:
    """The box of tile (r, c)."""
    x0 = self.grid_left + self.pad + c * (self.tile_w + self.pad)
    y0 = self.grid_top + self.pad + r * (self.tile_h + self.pad)
    return (x0, y0, x0 + self.tile_w, y0 + self.tile_h)


def _line_height(font) -> int:
  """Pixel height of one text line: the bottom of the ink of tall and descending glyphs drawn at y = 0."""
  return int(font.getbbox("Agjy|(")[3])


def _text_width(font, text: str) -> int:
  """Pixel width of the ink of `text`."""
  x0, _, x1, _ = font.getbbox(text)
  return int(math.ceil(x1 - min(x0, 0)))


def figure_layout(rows: int, cols: int, tile_h: int, tile_w: int, *, title: Optional[str] = None,
                  col_labels: Optional[Sequence[str]] = None, row_labels: Optional[Sequence[str]] = None,
                  pad: int = 2, margin: int = 6, font_size: int = FONT_SIZE, scale: int = 1) -> FigureLayout:
  """The geometry of a labelled figure of rows x cols tiles of tile_h x tile_w pixels (already upscaled).

  Top to bottom: margin, title band, header band, grid, margin; left to right: margin, row-label band, grid,
  margin. A band is line_height + 2·margin pixels high (line_height: the font's, 16 for the 13-pixel default
  font); the row-label band is the widest label + 2·margin wide. If the title is wider than all that, the
  figure widens to title width + 2·margin and the row labels and grid move right to stay centred.
  """
  if col_labels is not None and len(col_labels) != cols:
    raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
  if row_labels is not None and len(row_labels) != rows:
    raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
  font = load_font(font_size)
  band = _line_height(font) + 2 * margin
  grid_h, grid_w = rows * (tile_h + pad) + pad, cols * (tile_w + pad) + pad
  label_w = max(_text_width(font, s) for s in row_labels) + 2 * margin if row_labels else 0
  content_w = margin + label_w + grid_w + margin
  width = max(content_w, _text_width(font, title) + 2 * margin if title else 0)
  left = margin + (width - content_w) // 2
  y = margin
  title_box = None
  if title:
    title_box, y = (0, y, width, y + band), y + band
  col_boxes: tuple[Box, ...] = ()
  grid_left = left + label_w
  if col_labels:
    xs = [grid_left + pad + c * (tile_w + pad) for c in range(cols)]
    col_boxes = tuple((x, y, x + tile_w, y + band) for x in xs)
    y += band
  grid_top = y
  row_boxes: tuple[Box, ...] = ()
  if row_labels:
    ys = [grid_top + pad + r * (tile_h + pad) for r in range(rows)]
    row_boxes = tuple((left, y0, left + label_w, y0 + tile_h) for y0 in ys)
  return FigureLayout(height=grid_top + grid_h + margin, width=width, rows=rows, cols=cols, tile_h=tile_h,
                      tile_w=tile_w, scale=scale, pad=pad, margin=margin, grid_top=grid_top, grid_left=grid_left,
                      grid_h=grid_h, grid_w=grid_w, title_box=title_box, col_label_boxes=col_boxes,
                      row_label_boxes=row_boxes)


def _draw_centred(draw, font, box: Box, text: str, ink) -> None:
  """Draws `text` with its ink centred horizontally in box and its line (not its ink) centred vertically."""
  x0, _, x1, _ = font.getbbox(text)
  line_h = _line_height(font)
  x = (box[0] + box[2]) / 2 - (x0 + x1) / 2
  y = (box[1] + box[3]) / 2 - line_h / 2
  draw.text((round(x), round(y)), text, fill=ink, font=font)


def labelled_figure(images: np.ndarray, cols: Optional[int] = None, *, title: Optional[str] = None,
                    col_labels: Optional[Sequence[str]] = None, row_labels: Optional[Sequence[str]] = None,
                    scale: Optional[int] = None, pad: int = 2, margin: int = 6,
                    font_size: int = FONT_SIZE) -> tuple[np.ndarray, FigureLayout]:
  """Renders uint8 tiles ([rows, cols, H, W, C] or [N, H, W, C] + cols) as a titled, labelled figure.

  Tiles are upscaled (scale None: auto_scale, to at least 64 pixels a side) and bordered as in make_grid, on a
  white background with black text in Pillow's built-in font. Returns the uint8 [height, width, C] figure (C as
  the tiles': grayscale stays one channel) and its FigureLayout.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"labelled_figure takes uint8 tiles (see to_uint8), got {images.dtype}")
  flat, rows, cols = _as_tiles(images, cols)
  scale = auto_scale(flat.shape[1], flat.shape[2]) if scale is None else scale
  grid = make_grid(flat, cols, pad=pad, scale=scale)
  channels = grid.shape[-1]
  layout = figure_layout(rows, cols, flat.shape[1] * scale, flat.shape[2] * scale, title=title,
                         col_labels=col_labels, row_labels=row_labels, pad=pad, margin=margin,
                         font_size=font_size, scale=scale)
  figure = np.full((layout.height, layout.width, channels), BACKGROUND, np.uint8)
  figure[layout.grid_top:layout.grid_top + layout.grid_h, layout.grid_left:layout.grid_left + layout.grid_w] = grid
  ink = INK if channels == 1 else (INK,) * 3
  canvas = Image.fromarray(figure[..., 0] if channels == 1 else figure)  # mode L or RGB
  draw, font = ImageDraw.Draw(canvas), load_font(font_size)
  labelled = [(layout.title_box, title)] if title else []
  labelled += list(zip(layout.col_label_boxes, col_labels or ()))
  labelled += list(zip(layout.row_label_boxes, row_labels or ()))
  for box, text in labelled:
    _draw_centred(draw, font, box, text, ink)
  out = np.asarray(canvas, np.uint8)
  return (out[..., None] if channels == 1 else out), layout


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 HWC image (1 or 3 channels) as PNG, creating its folder."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(path).open("wb") as f:
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")


def class_rows(classes: Sequence[int], num_samples: int) -> tuple[np.ndarray, Optional[int]]:
  """(labels, columns) that lay num_samples out one class per grid row: class k of `classes` fills row k (one
  class: every sample of it, columns None for make_grid's square layout)."""
  classes = list(classes)
  if len(classes) == 1:
    return np.full(num_samples, classes[0], np.int32), None
  cols = -(-num_samples // len(classes))
  return np.array([classes[i // cols] for i in range(num_samples)], np.int32), cols


def save_samples(path: str, images: np.ndarray, cols: Optional[int] = None, scale: Optional[int] = None,
                 labels: Optional[np.ndarray] = None) -> tuple[str, str]:
  """Writes [-1, 1] samples as an upscaled, bordered PNG grid and their uint8 array as a same-stem .npz.

  The grid is make_grid(to_uint8(images), cols, scale=scale) (scale None: auto_scale, at least 64 pixels a side;
  1: as they are); the .npz holds the uint8 [N, H, W, C] samples at their own size under the key `images` and
  their int class labels under `labels` (-1: unconditional). Returns (png path, npz path).
  """
  u8 = to_uint8(images)
  save_png(path, make_grid(u8, cols, scale=scale))
  npz = os.path.splitext(path)[0] + ".npz"
  labels = np.full(len(u8), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
  np.savez_compressed(npz, images=u8, labels=labels)
  return path, npz
