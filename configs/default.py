"""The offline default: scikit-learn's embedded 8x8 digits and a tiny U-Net, minutes on a 2-core CPU.

Its time and sample quality are in README.md's "Results"; the recipe's tuning is in docs/results.md.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """The default experiment."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # a run is a function of (config, seed)
  config.dataset = "digits"  # digits | tfds:<name> | folder:<path>
  config.image_size = 8
  config.batch_size = 64  # global, over all devices and processes
  config.num_train_steps = 6000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.parallelism = "pmap"  # several devices: pmap | jit (mesh, state replicated) | fsdp (state sharded)
  config.eval_every_steps = 0  # > 0: sample eval_num_samples with the EMA params and score them
  config.eval_num_samples = 1000
  config.eval_batch_size = 100  # Inception batch (datasets other than digits)
  config.inception_weights = placeholder(str)  # FID weights for datasets other than digits (docs/evaluation.md)
  config.fid_num_real = 50_000  # real images in the FID reference statistics (capped at the split's size)
  config.eval = common.evaluation()  # more evaluation at eval_every_steps: the likelihood bound

  config.data = ml_collections.ConfigDict()
  config.data.split = "train"
  config.data.data_dir = placeholder(str)  # TFDS data_dir; None: TFDS's default
  config.data.channels = 1  # 1 (grayscale) | 3 (RGB)
  config.data.random_flip = False
  config.data.worker_count = placeholder(int)  # decoding processes for files; None: one per core, 0: none

  config.wandb = common.wandb()

  config.model = common.model("tiny", attn_resolutions=(4,))  # attention at 4x4 of the 8x8 digits

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "cosine"  # linear | cosine | book_cosine | quadratic | sigmoid
  config.diffusion.num_timesteps = 1000
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.loss = "l1"  # l1 | l2
  config.diffusion.prediction = "eps"  # what the network predicts: eps | v | x0
  config.diffusion.loss_weighting = "none"  # none | min_snr
  config.diffusion.min_snr_gamma = 5.0  # γ of min_snr
  config.diffusion.cond_drop_prob = 0.1  # conditional models: each label dropped (no label) with this probability
  config.diffusion.vlb_weight = 0.001  # λ of the hybrid loss simple + λ T L_t, with model.learn_variance=True

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = "adamw"  # adam | adamw
  config.optim.learning_rate = 2e-3  # peak, after warmup
  config.optim.lr_schedule = "cosine"  # constant | cosine (to 0 at num_train_steps)
  config.optim.warmup_steps = 200  # linear from 0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 1.0  # global-norm clipping; 0: off
  config.optim.grad_accum_steps = 1  # micro-steps per update

  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.9995  # in [0, 1); 0 keeps no average
  # decay min(decay, (1 + n) / (10 + n)) after n updates. Over 6,000 steps the warmup term stays below 0.999
  # (0.9985 at the last step), so it alone sets the decay here: decay 0.999 trains the same bits.
  config.ema.warmup = True

  config.sample = ml_collections.ConfigDict()
  config.sample.method = "dpmpp_2m"  # ddpm | ddim | dpmpp_2m (docs/results.md: best here at 10 steps)
  config.sample.num_steps = 10  # ddim / dpmpp_2m model calls (ddpm runs all num_timesteps)
  config.sample.eta = 0.0  # ddim noise: 0 deterministic .. 1 ancestral-like
  config.sample.timestep_spacing = "leading"  # leading | trailing | linspace
  config.sample.variance = "fixed_small"  # ddpm: fixed_small (posterior) | fixed_large (β)
  config.sample.clip_x0 = True  # clip the predicted x0 to [-1, 1]
  config.sample.guidance_scale = 1.0  # conditional models: 0 unconditional, 1 conditional, > 1 guided
  config.sample.every_steps = 2000  # > 0: a grid of num_samples EMA samples (PNG and TensorBoard) every so many steps
  config.sample.num_samples = 64
  config.sample.batch_size = 256  # samples per sampler call, split over every device (of every process)
  return config
