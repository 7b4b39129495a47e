"""The default run with learned variances (Nichol & Dhariwal 2021): the hybrid loss and the likelihood bound.

`python train.py --config configs/digits_hybrid.py --workdir runs/hybrid`, then
`python sample.py --workdir runs/hybrid --nll 1000` (bits/dim) or
`python sample.py --workdir runs/hybrid --method ddpm --steps 100` (ancestral
sampling on 100 respaced steps, with the learned variances).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The hybrid-loss digits experiment."""
  config = default.get_config()
  config.model.learn_variance = True  # twice the output channels: ε, then v of log σ² = frac log β + (1-frac) log β̃
  config.diffusion.vlb_weight = 0.001  # λ: simple + λ T L_t, the mean's gradient stopped in L_t (their value)
  return config
