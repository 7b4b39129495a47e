"""Writes the diffusers fixtures of tests/test_pretrained.py (run once, where torch and diffusers are installed).

  python tools/make_diffusers_fixture.py [--out tests/fixtures/diffusers]

Two tiny random UNet2DModels of 2 levels (8x8 RGB, widths 4 and 8, attention
at 4x4): `pipeline/` a DDPMPipeline folder whose U-Net has the DDPM
checkpoints' settings (one head, time embedding [sin, cos] with freq_shift 1,
downsample padding 0, norm epsilon 1e-6); `bin/` the same U-Net as PyTorch's
.bin with the older attention names (query, key, value, proj_attn), as the
256-pixel checkpoints ship it; `heads/` a U-Net with diffusers' defaults (two
heads, [cos, sin], freq_shift 0, padding 1; epsilon 1e-3). `outputs.npz` holds
fixed inputs (x NCHW, t) and diffusers' outputs of both U-Nets on them.
"""

import argparse
import os

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

TINY = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=2)
DDPM = dict(attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
# norm_eps 1e-3, not diffusers' 1e-5: large enough that a wrong epsilon shows above float32 rounding in the outputs
HEADS = dict(attention_head_dim=4, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-3)
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def random_unet(seed: int, **settings) -> UNet2DModel:
  """A tiny UNet2DModel whose every weight (norms included) is random."""
  torch.manual_seed(seed)
  model = UNet2DModel(**TINY, **settings).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


def legacy_names(state: dict) -> dict:
  """A state dict with the attention weights under their older names."""
  out = {}
  for key, value in state.items():
    for new, old in LEGACY.items():
      key = key.replace(f".{new}.", f".{old}.")
    out[key] = value.contiguous()
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("tests", "fixtures", "diffusers"))
  out = parser.parse_args().out
  ddpm, heads = random_unet(0, **DDPM), random_unet(1, **HEADS)
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                            clip_sample=True)
  DDPMPipeline(unet=ddpm, scheduler=scheduler).save_pretrained(os.path.join(out, "pipeline"))
  ddpm.save_pretrained(os.path.join(out, "bin"), safe_serialization=False)
  torch.save(legacy_names(ddpm.state_dict()), os.path.join(out, "bin", "diffusion_pytorch_model.bin"))
  heads.save_pretrained(os.path.join(out, "heads"))
  g = torch.Generator().manual_seed(2)
  x = torch.randn(4, 3, 8, 8, generator=g)
  t = torch.tensor([0, 10, 500, 999])
  with torch.no_grad():
    outputs = {name: m(x, t).sample.numpy() for name, m in (("ddpm", ddpm), ("heads", heads))}
  np.savez(os.path.join(out, "outputs.npz"), x=x.numpy(), t=t.numpy(), **outputs)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
