"""The DDPM paper's CIFAR-10 setup (Ho et al. 2020), with this project's L1 loss (diffusion.loss=l2: the paper's)."""

import ml_collections

from configs import common, default


def get_config() -> ml_collections.ConfigDict:
  """The DDPM paper's CIFAR-10 experiment: 35.7M parameters, 800k steps of batch 128."""
  config = default.get_config()
  config.dataset = "tfds:cifar10"
  config.image_size = 32
  config.batch_size = 128
  config.num_train_steps = 800_000
  config.log_every_steps = 500
  config.checkpoint_every_steps = 10_000
  config.eval_num_samples = 10_000  # FID, KID and IS at eval_every_steps > 0

  config.data.channels = 3
  config.data.random_flip = True

  config.model = common.model("ddpm_cifar10")

  config.diffusion.schedule = "linear"  # the paper's: β from 1e-4 to 0.02

  config.optim.optimizer = "adam"
  config.optim.learning_rate = 2e-4
  config.optim.lr_schedule = "constant"
  config.optim.warmup_steps = 5000

  config.ema.decay = 0.9999
  config.ema.warmup = False

  config.sample.method = "ddpm"  # the paper's 1,000-step ancestral sampler
  config.sample.num_steps = 1000
  config.sample.eta = 1.0
  config.sample.variance = "fixed_large"  # σ² = β, as the paper samples
  config.sample.every_steps = 50_000
  config.sample.batch_size = 64
  return config
