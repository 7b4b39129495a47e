"""The DDPM paper's CIFAR-10 setup (Ho et al. 2020), with this project's L1 loss (set diffusion.loss=l2 for the paper's)."""

import ml_collections

from ddpm_jax.unet import preset_config


def get_config() -> ml_collections.ConfigDict:
  """The DDPM paper's CIFAR-10 experiment: 35.7M parameters, 800k steps of batch 128."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "tfds:cifar10"
  config.image_size = 32
  config.batch_size = 128
  config.num_train_steps = 800_000
  config.log_every_steps = 500
  config.checkpoint_every_steps = 10_000
  config.keep_checkpoints = 3
  config.eval_every_steps = 0  # > 0: sample eval_num_samples with the EMA params and report FID, KID and IS
  config.eval_num_samples = 10_000
  config.eval_batch_size = 100
  config.inception_weights = ml_collections.config_dict.placeholder(str)  # tools/convert_inception_weights.py
  config.fid_num_real = 50_000  # real images in the reference statistics (capped at the split's size)

  config.data = ml_collections.ConfigDict(dict(
      split="train", data_dir=ml_collections.config_dict.placeholder(str), download=True, channels=3,
      random_flip=True, shuffle_buffer=50_000))
  config.model = ml_collections.ConfigDict(preset_config("ddpm_cifar10"))
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, loss="l1"))
  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adam", learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=5000,
      lr_schedule="constant", grad_clip_norm=1.0, grad_accum_steps=1))
  config.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=False))
  config.sample = ml_collections.ConfigDict(dict(
      method="ddpm", num_steps=1000, eta=1.0, variance="fixed_large", clip_x0=True, every_steps=50_000,
      num_samples=64, batch_size=64))
  return config
