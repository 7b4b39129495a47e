"""ddpm_jax against diffusers on the DDPM checkpoints' U-Nets (needs torch and diffusers; not part of CI).

  python benchmarks/diffusers_parity.py                      # outputs: google/ddpm-cifar10-32's config
  python benchmarks/diffusers_parity.py --configs cifar10,256  # and the 256-pixel checkpoints' config
  python benchmarks/diffusers_parity.py --speed               # sampling speed, batch 16 (tens of minutes on a CPU)

Outputs: a UNet2DModel with the config and random weights (GroupNorm scales and biases randomised too), saved by
diffusers, imported with ddpm_jax.pretrained.from_diffusers; the largest difference of our forward from diffusers'
over a batch of noise at several t, relative to the largest output. Then exported with to_diffusers, loaded by
diffusers' UNet2DModel.from_pretrained, and compared with the first diffusers model's outputs the same way.

Speed: the same random CIFAR-10 weights as a DDPM pipeline (linear schedule, fixed_large variance, clipping, as the
upload's scheduler); ours (jit, lax.scan) with DDIM-50 and DDPM-1000, against diffusers' DDIMPipeline and
DDPMPipeline, batch 16, each timed once: ours compiled ahead (the compile timed apart), diffusers' after a 2-step
warm-up call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import builders, parallel, pretrained, sampling
from ddpm_jax.unet import unet_preset

# The configs of the published DDPM U-Nets: google/ddpm-cifar10-32's is our ddpm_cifar10 preset's
# (tests/test_pretrained.py checks it key by key); the 256-pixel ones (google/ddpm-celebahq-256, ddpm-ema-church-256,
# -bedroom-256, -cat-256) have six levels of widths 128, 128, 256, 256, 512, 512 with attention at 16x16.
CONFIGS = {
    "cifar10": pretrained.unet_config(unet_preset("ddpm_cifar10", dropout=0.0), 32, 3),
    "256": pretrained.unet_config(unet_preset("ddpm_cifar10", channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0), 256, 3),
}
TIMESTEPS = (0, 10, 250, 500, 999)


def random_unet(config: dict, seed: int = 0) -> UNet2DModel:
  """diffusers' UNet2DModel of a config with its own random initialisation, GroupNorm affines randomised too."""
  torch.manual_seed(seed)
  model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.add_(0.1 * torch.randn_like(module.weight))
        module.bias.add_(0.1 * torch.randn_like(module.bias))
  return model


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
  """max |ours - theirs| / max |theirs|."""
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def parity(name: str, batch: int) -> None:
  """Prints the import and export differences from diffusers of one config."""
  config = CONFIGS[name]
  size, channels = config["sample_size"], config["in_channels"]
  theirs_model = random_unet(config)
  x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
  t = torch.tensor([TIMESTEPS[i % len(TIMESTEPS)] for i in range(batch)])
  start = time.perf_counter()
  with torch.no_grad():
    theirs = theirs_model(x, t).sample.numpy()
  torch_s = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    theirs_model.save_pretrained(os.path.join(tmp, "theirs"))
    model, params = pretrained.from_diffusers(os.path.join(tmp, "theirs"))
    start = time.perf_counter()
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                           jnp.asarray(t.numpy()))).transpose(0, 3, 1, 2)
    jax_s = time.perf_counter() - start
    pretrained.to_diffusers(model, params, os.path.join(tmp, "ours"), image_size=size)
    back = UNet2DModel.from_pretrained(os.path.join(tmp, "ours")).eval()
    with torch.no_grad():
      exported = back(x, t).sample.numpy()
  n = sum(p.numel() for p in theirs_model.parameters())
  print(f"{name}: {n:,} parameters, batch {batch}, t = {t.tolist()}: import: largest relative difference "
        f"{relative_difference(ours, theirs):.2e} (largest |output| {np.abs(theirs).max():.3f}); export, loaded by "
        f"diffusers: {relative_difference(exported, theirs):.2e}; diffusers forward {torch_s:.1f} s, ours "
        f"{jax_s:.1f} s with compilation", flush=True)


def compile_ahead(generate, params: Any) -> float:
  """Compiles the sampler that generate(params, key, n) calls (lowered with the arrays it places), without running
  it; returns the seconds taken."""
  devices = jax.devices()
  _, rows, replicated = parallel.mesh_layout(devices, sharded=False)
  key = jax.random.key(0)
  args = (parallel.place(params, jax.tree_util.tree_map(lambda _: replicated, params)),
          parallel.place(jax.random.key_data(key), replicated), parallel.place(np.zeros(len(devices), np.int32), rows))
  start = time.perf_counter()
  generate.program(jax.random.key_impl(key), False).lower(*args).compile()
  return time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> float:
  """Seconds fn() takes."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def speed(batch: int) -> None:
  """Prints the sampling times of ours and diffusers' pipelines with the same random CIFAR-10 weights."""
  config = CONFIGS["cifar10"]
  unet = random_unet(config)
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                            clip_sample=True)
  with tempfile.TemporaryDirectory() as tmp:
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    model, params = pretrained.from_diffusers(tmp)
    settings = pretrained.diffusion_settings(tmp)
    schedule = pretrained.schedule_from_diffusers(tmp)
  shape = (config["sample_size"], config["sample_size"], config["in_channels"])
  pipelines = {"ddim": lambda: DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config)),
               "ddpm": lambda: DDPMPipeline(unet=unet, scheduler=scheduler)}
  runs = {"ddim-50": (sampling.SamplerOptions(method="ddim", num_steps=50, eta=0.0,
                                              clip_x0=settings["sample.clip_x0"]), "ddim", 50, {"eta": 0.0}),
          "ddpm-1000": (sampling.SamplerOptions(method="ddpm", variance=settings["sample.variance"],
                                                clip_x0=settings["sample.clip_x0"]), "ddpm", 1000, {})}
  for name, (options, kind, steps, extra) in runs.items():
    generate = sampling.make_generator(builders.model_fn(model), schedule, shape, options, batch_size=batch)
    compile_s = compile_ahead(generate, params)
    ours = timed(lambda: generate(params, jax.random.key(1), batch))  # the program compiled above: no compile
    theirs = lambda num_steps: pipelines[kind]()(batch_size=batch, num_inference_steps=num_steps, output_type="np",
                                                 generator=torch.Generator().manual_seed(0), **extra)
    with torch.no_grad():
      theirs(2)  # warm-up: PyTorch's first calls allocate and pick kernels
      torch_s = timed(lambda: theirs(steps))
    print(f"{name}, batch {batch}: ours {ours:.1f} s ({batch / ours:.3f} images/s; compiled ahead in {compile_s:.1f} "
          f"s), diffusers {torch_s:.1f} s ({batch / torch_s:.3f} images/s): ours {torch_s / ours:.2f}x as fast",
          flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="cifar10", help=f"comma-separated, of {', '.join(CONFIGS)}")
  parser.add_argument("--batch", type=int, default=None, help="default: 5 for parity (one per t), 16 for speed")
  parser.add_argument("--speed", action="store_true", help="time sampling instead of comparing outputs")
  args = parser.parse_args()
  print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
        f"({jax.devices()[0].platform})", flush=True)
  if args.speed:
    speed(args.batch or 16)
    return
  for name in args.configs.split(","):
    parity(name, args.batch or len(TIMESTEPS))


if __name__ == "__main__":
  main()
