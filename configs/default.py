"""The offline default: scikit-learn's embedded 8x8 digits, a tiny U-Net, minutes on a 2-core CPU."""

import ml_collections

from ddpm_jax.unet import preset_config


def get_config() -> ml_collections.ConfigDict:
  """The default experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "digits"
  config.image_size = 8
  config.batch_size = 128
  config.num_train_steps = 4000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3

  config.data = ml_collections.ConfigDict(dict(
      split="train", data_dir=ml_collections.config_dict.placeholder(str), download=True, channels=1,
      random_flip=False, shuffle_buffer=50_000))
  config.model = ml_collections.ConfigDict(preset_config("tiny", attn_resolutions=(4,)))
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, loss="l1"))
  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=200,
      lr_schedule="cosine", grad_clip_norm=1.0, grad_accum_steps=1))
  config.ema = ml_collections.ConfigDict(dict(decay=0.999, warmup=True))
  config.sample = ml_collections.ConfigDict(dict(
      method="ddim", num_steps=100, eta=1.0, variance="fixed_small", clip_x0=True, every_steps=0, num_samples=64,
      batch_size=256))
  return config
