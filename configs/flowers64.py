"""The book's setup: Oxford Flowers 102 at 64x64, its 133.4M-parameter U-Net, L1 loss, DDIM-50 sampling."""

import ml_collections

from configs import common, default


def get_config() -> ml_collections.ConfigDict:
  """Chapter 15 of Learn Generative AI with PyTorch: batch 4, 100 epochs over the 8,189 images."""
  config = default.get_config()
  config.dataset = "tfds:oxford_flowers102"
  config.image_size = 64
  config.batch_size = 4
  config.num_train_steps = 204_725  # 100 epochs of 8,189 images in batches of 4
  config.log_every_steps = 500
  config.checkpoint_every_steps = 10_000
  config.eval_num_samples = 10_000  # FID, KID and IS at eval_every_steps > 0

  config.data.split = "train+validation+test"  # all 8,189 images, as the book trains
  config.data.channels = 3
  config.data.random_flip = True

  config.model = common.model("book64")

  config.diffusion.schedule = "book_cosine"  # cosine betas clipped into [beta_start, beta_end]

  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 300
  config.optim.b1 = 0.95
  config.optim.weight_decay = 1e-5
  config.optim.grad_clip_norm = 0.0  # the book does not clip

  config.ema.decay = 0.0  # the book keeps no EMA
  config.ema.warmup = False

  config.sample.method = "ddim"  # the book's: 50 steps, t = 980, 960, ..., 0
  config.sample.num_steps = 50
  config.sample.eta = 1.0
  config.sample.every_steps = 20_000
  config.sample.num_samples = 10
  config.sample.batch_size = 10
  return config
