"""The book's figures, labelled: forward diffusion, ten samples, and a denoising trajectory drawn by the sampler."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np

from ddpm_jax import diffusion, images, sampling
from ddpm_jax.schedule import Schedule

FORWARD_TIMESTEPS = (0, 199, 399, 599, 799, 999)
TRAJECTORY_TIMESTEPS = (800, 600, 400, 200, 0)


def forward_diffusion_figure(x0: np.ndarray, schedule: Schedule, key: jax.Array,
                             timesteps: tuple[int, ...] = FORWARD_TIMESTEPS,
                             scale: Optional[int] = None) -> np.ndarray:
  """uint8 figure: one row per image of x0, one column per timestep t of q_sample(x0, t), headed "t = ..."."""
  noise = jax.random.normal(key, x0.shape)
  frames = np.stack([np.asarray(diffusion.q_sample(schedule, x0, np.full(len(x0), t), noise)) for t in timesteps],
                    axis=1)
  figure, _ = images.labelled_figure(images.to_uint8(frames), title="Forward diffusion: x_t ~ q(x_t | x_0)",
                                     col_labels=[f"t = {t}" for t in timesteps], scale=scale)
  return figure


def trajectory_states(x_T: np.ndarray, trajectory: np.ndarray, chain_timesteps: np.ndarray,
                      show: tuple[int, ...] = TRAJECTORY_TIMESTEPS) -> tuple[np.ndarray, list[int]]:
  """[samples, len(show), H, W, C]: the chain's state entering the step nearest each shown t (t = 0: the final
  x_0); and the timesteps actually shown."""
  states = np.concatenate([x_T[None], trajectory[:-1]])  # states[i] enters the step at chain_timesteps[i]
  picked, shown = [], []
  for t in show:
    i = len(trajectory) if t == 0 else int(np.argmin(np.abs(np.asarray(chain_timesteps) - t)))
    picked.append(trajectory[-1] if t == 0 else states[i])
    shown.append(0 if t == 0 else int(chain_timesteps[i]))
  return np.stack(picked, axis=1), shown


def ten_indices(labels: Optional[np.ndarray], count: int) -> list[int]:
  """Which of `count` samples the ten-sample figure shows: the first ten, or with labels the first of each class
  asked for (in class order), then the next ones."""
  if labels is None:
    return list(range(min(10, count)))
  firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
  return (firsts + [i for i in range(count) if i not in set(firsts)])[:10]


def write_book_figures(stem: str, real: np.ndarray, samples: np.ndarray, eps_fn: Callable, schedule: Schedule,
                       key: jax.Array, options: sampling.SamplerOptions, scale: Optional[int] = None,
                       labels: Optional[np.ndarray] = None) -> list[int]:
  """Writes STEM_forward.png (4 data images noised to t = 0, 199, ..., 999), STEM_ten.png (10 samples, 2x5; of a
  conditional model, one per class asked for first) and STEM_trajectory.png (4 samples denoised, t = 800 .. 0; of a
  conditional model, the classes asked for in turn, guided), labelled; returns the trajectory's timesteps."""
  images.save_png(f"{stem}_forward.png",
                  forward_diffusion_figure(real[:4], schedule, jax.random.fold_in(key, 1), scale=scale))
  ten, _ = images.labelled_figure(images.to_uint8(samples[ten_indices(labels, len(samples))]), cols=5,
                                  title=f"Ten samples ({options.method})", scale=scale)
  images.save_png(f"{stem}_ten.png", ten)
  x_T = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (4,) + real.shape[1:]))
  traj_labels = None if labels is None else np.resize(np.unique(labels), 4).astype(np.int32)
  _, traj = options.sample(eps_fn, schedule, key, x_T.shape, x_T=x_T, return_trajectory=True, labels=traj_labels)
  chain = sampling.timesteps(options.method, schedule.num_timesteps, options.num_steps, options.timestep_spacing)
  frames, shown = trajectory_states(x_T, np.asarray(traj), chain)
  figure, _ = images.labelled_figure(images.to_uint8(frames), title=f"Denoising trajectory ({options.method})",
                                     col_labels=[f"t = {t}" for t in shown], scale=scale)
  images.save_png(f"{stem}_trajectory.png", figure)
  return shown
