"""The DDPM paper's CIFAR-10 setup (Ho et al. 2020), with this project's L1 loss (diffusion.loss=l2: the paper's)."""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """The DDPM paper's CIFAR-10 experiment: 35.7M parameters, 800k steps of batch 128."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = "tfds:cifar10"
  config.image_size = 32
  config.batch_size = 128  # global, over all devices and processes
  config.num_train_steps = 800_000
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
  config.data.split = "train"
  config.data.data_dir = placeholder(str)  # TFDS data_dir; None: TFDS's default
  config.data.channels = 3
  config.data.random_flip = True
  config.data.worker_count = placeholder(int)  # decoding processes for files; None: one per core, 0: none

  config.wandb = common.wandb()

  config.model = common.model("ddpm_cifar10")

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.loss = "l1"  # the paper's is l2
  config.diffusion.prediction = "eps"  # eps | v | x0
  config.diffusion.loss_weighting = "none"  # none | min_snr
  config.diffusion.min_snr_gamma = 5.0
  config.diffusion.cond_drop_prob = 0.1  # conditional models: each label dropped (no label) with this probability
  config.diffusion.vlb_weight = 0.001  # λ of the hybrid loss simple + λ T L_t, with model.learn_variance=True

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 2e-4
  config.optim.lr_schedule = "constant"
  config.optim.warmup_steps = 5000
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 1.0
  config.optim.grad_accum_steps = 1

  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.9999
  config.ema.warmup = False

  config.sample = ml_collections.ConfigDict()
  config.sample.method = "ddpm"  # the paper's 1,000-step ancestral sampler
  config.sample.num_steps = 1000
  config.sample.eta = 1.0
  config.sample.timestep_spacing = "leading"
  config.sample.variance = "fixed_large"  # σ² = β, as the paper samples
  config.sample.clip_x0 = True
  config.sample.guidance_scale = 1.0  # conditional models: 0 unconditional, 1 conditional, > 1 guided
  config.sample.every_steps = 50_000
  config.sample.num_samples = 64
  config.sample.batch_size = 64
  return config
