"""The book's setup: Oxford Flowers 102 at 64x64, its 133.4M-parameter U-Net, L1 loss, DDIM-50 sampling."""

import ml_collections

from ddpm_jax.unet import preset_config


def get_config() -> ml_collections.ConfigDict:
  """Chapter 15 of Learn Generative AI with PyTorch: batch 4, 100 epochs over the 8,189 images."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "tfds:oxford_flowers102"
  config.image_size = 64
  config.batch_size = 4
  config.num_train_steps = 204_725  # 100 epochs of 8,189 images in batches of 4
  config.log_every_steps = 500
  config.checkpoint_every_steps = 10_000
  config.keep_checkpoints = 3
  config.eval_every_steps = 0  # > 0: sample eval_num_samples with the EMA params and report FID, KID and IS
  config.eval_num_samples = 10_000
  config.eval_batch_size = 100
  config.inception_weights = ml_collections.config_dict.placeholder(str)  # tools/convert_inception_weights.py
  config.fid_num_real = 50_000  # real images in the reference statistics (capped at the split's size)

  config.data = ml_collections.ConfigDict(dict(
      split="train+validation+test", data_dir=ml_collections.config_dict.placeholder(str), download=True,
      channels=3, random_flip=True, shuffle_buffer=10_000))
  config.model = ml_collections.ConfigDict(preset_config("book64"))
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="book_cosine", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, loss="l1"))
  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", learning_rate=1e-4, b1=0.95, b2=0.999, eps=1e-8, weight_decay=1e-5, warmup_steps=300,
      lr_schedule="cosine", grad_clip_norm=0.0, grad_accum_steps=1))
  config.ema = ml_collections.ConfigDict(dict(decay=0.0, warmup=False))  # the book keeps no EMA
  config.sample = ml_collections.ConfigDict(dict(
      method="ddim", num_steps=50, eta=1.0, variance="fixed_small", clip_x0=True, every_steps=20_000,
      num_samples=10, batch_size=10))
  return config
