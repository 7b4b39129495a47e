"""The book's setup: Oxford Flowers 102 at 64x64, its 133.4M-parameter U-Net, L1 loss, DDIM-50 sampling."""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


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
  config.parallelism = "pmap"  # several devices: pmap | jit (mesh, state replicated) | fsdp (state sharded)
  config.eval_every_steps = 0  # > 0: sample eval_num_samples with the EMA params and report FID, KID and IS
  config.eval_num_samples = 10_000
  config.eval_batch_size = 100  # Inception batch
  config.inception_weights = placeholder(str)  # the file tools/convert_inception_weights.py writes
  config.fid_num_real = 50_000  # real images in the reference statistics (capped at the split's size)
  config.eval = common.evaluation()  # more evaluation at eval_every_steps: the likelihood bound

  config.data = ml_collections.ConfigDict()
  config.data.split = "train+validation+test"  # all 8,189 images, as the book trains
  config.data.data_dir = placeholder(str)
  config.data.channels = 3
  config.data.random_flip = True
  config.data.worker_count = placeholder(int)  # decoding processes for files; None: one per core, 0: none

  config.wandb = common.wandb()

  config.model = common.model("book64")

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "book_cosine"  # cosine betas clipped into [beta_start, beta_end]
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.loss = "l1"
  config.diffusion.prediction = "eps"
  config.diffusion.loss_weighting = "none"
  config.diffusion.min_snr_gamma = 5.0
  config.diffusion.cond_drop_prob = 0.1  # conditional models: each label dropped (no label) with this probability
  config.diffusion.vlb_weight = 0.001  # λ of the hybrid loss simple + λ T L_t, with model.learn_variance=True

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = "adamw"
  config.optim.learning_rate = 1e-4
  config.optim.lr_schedule = "cosine"
  config.optim.warmup_steps = 300
  config.optim.b1 = 0.95
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 1e-5
  config.optim.grad_clip_norm = 0.0  # the book does not clip
  config.optim.grad_accum_steps = 1

  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.0  # the book keeps no EMA
  config.ema.warmup = False

  config.sample = ml_collections.ConfigDict()
  config.sample.method = "ddim"  # the book's: 50 steps, t = 980, 960, ..., 0
  config.sample.num_steps = 50
  config.sample.eta = 1.0
  config.sample.timestep_spacing = "leading"
  config.sample.variance = "fixed_small"
  config.sample.clip_x0 = True
  config.sample.guidance_scale = 1.0  # conditional models: 0 unconditional, 1 conditional, > 1 guided
  config.sample.every_steps = 20_000
  config.sample.num_samples = 10
  config.sample.batch_size = 10
  return config
