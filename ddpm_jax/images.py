"""Image output: [-1, 1] floats to uint8, grids, PNG and npz files."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 in 0..255, rounded and clipped."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: Optional[int] = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 [rows·(H+pad)+pad, cols·(W+pad)+pad, C] image, row-major."""
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for k, image in enumerate(images):
    r, q = divmod(k, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
  return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  """Writes a uint8 HWC image (1 or 3 channels) as PNG, optionally enlarged by pixel repetition."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def save_samples(path: str, images: np.ndarray, cols: Optional[int] = None) -> tuple[str, str]:
  """Writes [-1, 1] samples as a PNG grid at `path` and their uint8 NHWC array as `images` in a same-stem .npz."""
  u8 = to_uint8(images)
  small = max(u8.shape[1], u8.shape[2]) < 32
  save_png(path, make_grid(u8, cols), upscale=4 if small else 1)
  npz = os.path.splitext(path)[0] + ".npz"
  np.savez_compressed(npz, images=u8)
  return path, npz


FORWARD_TIMESTEPS = (0, 199, 399, 599, 799, 999)
TRAJECTORY_TIMESTEPS = (800, 600, 400, 200, 0)


def forward_diffusion_grid(x0: np.ndarray, schedule, key, timesteps=FORWARD_TIMESTEPS) -> np.ndarray:
  """uint8 grid: one row per image of x0, one column per timestep of q_sample(x0, t) (the book's first figure)."""
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax import diffusion  # pylint: disable=g-import-not-at-top

  noise = jax.random.normal(key, x0.shape)
  cols = [np.asarray(diffusion.q_sample(schedule, x0, np.full(len(x0), t), noise)) for t in timesteps]
  frames = np.stack(cols, axis=1).reshape((-1,) + x0.shape[1:])  # row-major: image, then t
  return make_grid(to_uint8(frames), cols=len(timesteps))


def trajectory_grid(x_T: np.ndarray, trajectory: np.ndarray, chain_timesteps: np.ndarray,
                    show=TRAJECTORY_TIMESTEPS) -> tuple[np.ndarray, list[int]]:
  """uint8 grid of the chain's state entering the step nearest each shown t (t = 0: the final x_0), one row per sample.

  Returns the grid and the timesteps actually shown.
  """
  states = np.concatenate([x_T[None], trajectory[:-1]])  # states[i] enters the step at chain_timesteps[i]
  picked, shown = [], []
  for t in show:
    if t == 0:
      picked.append(trajectory[-1])
      shown.append(0)
      continue
    i = int(np.argmin(np.abs(np.asarray(chain_timesteps) - t)))
    picked.append(states[i])
    shown.append(int(chain_timesteps[i]))
  frames = np.stack(picked, axis=1).reshape((-1,) + x_T.shape[1:])
  return make_grid(to_uint8(frames), cols=len(show)), shown


def write_book_figures(stem: str, real: np.ndarray, samples: np.ndarray, eps_fn, schedule, key,
                       sample_kw: dict) -> list[int]:
  """Writes the book's three figures as STEM_forward.png (4 data images noised to t = 0, 199, ..., 999),
  STEM_ten.png (10 samples, 2x5) and STEM_trajectory.png (4 samples denoised, t = 800 .. 0); returns the
  trajectory's timesteps."""
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax import sampling  # pylint: disable=g-import-not-at-top

  upscale = 4 if real.shape[1] < 32 else 1
  save_png(f"{stem}_forward.png", forward_diffusion_grid(real[:4], schedule, jax.random.fold_in(key, 1)), upscale)
  save_png(f"{stem}_ten.png", make_grid(to_uint8(samples[:10]), cols=5), upscale)
  x_T = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (4,) + real.shape[1:]))
  _, traj = sampling.sample(eps_fn, schedule, key, x_T.shape, x_T=x_T, return_trajectory=True, **sample_kw)
  chain = sampling.timesteps(sample_kw.get("method", "ddpm"), schedule.num_timesteps, sample_kw.get("num_steps"),
                             sample_kw.get("timestep_spacing", "leading"))
  grid, shown = trajectory_grid(x_T, np.asarray(traj), chain)
  save_png(f"{stem}_trajectory.png", grid, upscale)
  return shown
