"""Train-step, forward and sampler throughput, FLOP/s against the measured matmul peak, memory, and a PyTorch peer.

  python benchmarks/bench.py --preset tiny --batch 64 --precision fp32
  python benchmarks/bench.py --preset tiny,ddpm_cifar10 --batch 16 --precision fp32,bf16 --markdown table.md
  python benchmarks/bench.py --device gpu --preset ddpm_cifar10,book64 --batch 128 --precision bf16 --json gpu.json
  python benchmarks/bench.py --memory --markdown memory.md

--memory compiles (runs nothing) the train steps of book64 at batch 64 and
ddpm_cifar10 at batch 128 under jit and fsdp over 1, 4 and 8 simulated CPU
devices and reports XLA's per-device memory analysis of each.

Every number is a median over --repeats timed runs after a warm-up, each run
at least --min_run_s long, with its spread ((max - min) / median); compile
times are reported apart. FLOPs are counted analytically, layer by layer
(benchmarks/flops.py), the same way on every backend. The peer
(benchmarks/torch_unet.py, same architecture and parameter count) runs in the
same process after JAX, when PyTorch is installed; --torch_compile adds the
torch.compile peer beside the eager one. Each phase prints a progress line
("[bench] <phase> ...") as it starts and ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ of this checkout
import flops  # pylint: disable=g-import-not-at-top  (benchmarks/flops.py, beside this script)
import report  # pylint: disable=g-import-not-at-top  (benchmarks/report.py, beside this script)

PRESET_SIZES = {"tiny": 32, "ddpm_cifar10": 32, "book64": 64}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
# |peer / JAX - 1| of forward FLOPs allowed. Both counts include the taps in the zero padding; PyTorch's counter
# leaves out the biases and norms that flops.py counts (measured: 0.08% of book64's count, 0.23% of ddpm_cifar10's,
# 1.6% of tiny's at 32x32 and 1.8% at 8x8). Not yet run against PyTorch with this count (no PyTorch here).
FLOP_TOLERANCE = 0.03


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Command-line options; lists are comma-separated."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny", help="comma-separated: tiny, ddpm_cifar10, book64")
  p.add_argument("--batch", default="16", help="comma-separated batch sizes")
  p.add_argument("--precision", default="", help="comma-separated: fp32, bf16 (bf16 compute, fp32 params); "
                 "default fp32 on CPU, bf16 on GPU")
  p.add_argument("--image_size", type=int, default=0, help="0: the preset's own (tiny 32, ddpm_cifar10 32, book64 64)")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--parallelism", choices=("pmap", "jit", "fsdp"), default="pmap",
                 help="how the train step spreads over several devices (one device: plain jit whatever this says)")
  # ddpm_jax.unet.ATTENTIONS, spelled out: this script imports JAX only where it measures
  p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                 help="the U-Net's attention kernel (ddpm_jax.unet.attend): auto takes cuDNN's on a GPU in bf16")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is reported)")
  p.add_argument("--steps", type=int, default=5, help="train steps or forward passes per timed run (at least)")
  p.add_argument("--min_run_s", type=float, default=0.0, help="lengthen each timed train / forward run to at least "
                 "this many seconds (the step count from the warm-up run's time)")
  p.add_argument("--ddpm1000", choices=("auto", "on", "off"), default="auto",
                 help="time DDPM-1000 sampling (auto: on GPU, and for tiny on CPU)")
  p.add_argument("--sample_repeats", type=int, default=3, help="timed runs of each sampler (after a first call)")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--torch_channels_last", action="store_true", help="run the peer in channels_last memory format")
  p.add_argument("--torch_compile", action="store_true", help="also time the peer under torch.compile, beside eager")
  p.add_argument("--json", default="", help="write the results here (one object, or a list for several configs)")
  p.add_argument("--markdown", default="", help="write the results table here")
  p.add_argument("--memory", action="store_true", help="per-device memory of jit and fsdp train steps over 1, 4 "
                 "and 8 devices, from XLA's compiled memory analysis (nothing runs; other options ignored)")
  p.add_argument("--check_peer_only", action="store_true", help=argparse.SUPPRESS)  # the child of checked_peer
  args = p.parse_args(argv)
  args.presets = args.preset.split(",")
  args.batches = [int(b) for b in args.batch.split(",")]
  args.precisions = (args.precision or ("bf16" if args.device == "gpu" else "fp32")).split(",")
  bad = ([f"--preset {x}" for x in args.presets if x not in PRESET_SIZES] +
         [f"--precision {x}" for x in args.precisions if x not in PRECISIONS] +
         [f"--batch {b}" for b in args.batches if b < 1])
  if bad or min(args.repeats, args.steps, args.sample_repeats) < 1:
    what = ", ".join(bad) or "--repeats/--steps/--sample_repeats (must be >= 1)"
    p.error(f"invalid {what}: presets are {', '.join(PRESET_SIZES)}, "
            f"precisions {', '.join(PRECISIONS)}, batches positive integers")
  return args


def progress(phase: str, what: str) -> None:
  """One progress line on stdout, at once."""
  print(f"[bench] {phase}: {what}", flush=True)


def median_rate(run: Callable[[], None], items: int, repeats: int) -> tuple[float, float]:
  """(median over repeats of items / seconds of run() (which must block until done), spread: (max - min) / median
  of those rates)."""
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    rates.append(items / (time.perf_counter() - start))
  median = statistics.median(rates)
  return median, (max(rates) - min(rates)) / median


def timed_steps(run: Callable[[int], None], per_step: int, args: argparse.Namespace) -> tuple[float, float, int]:
  """(median items/s, spread, steps per run) of run(n) (n steps of per_step items each, blocking): a warm-up run
  of --steps steps, then --repeats runs of at least --steps steps and --min_run_s seconds each."""
  start = time.perf_counter()
  run(args.steps)
  per_step_s = (time.perf_counter() - start) / args.steps
  n = max(args.steps, math.ceil(args.min_run_s / per_step_s))
  rate, spread = median_rate(lambda: run(n), n * per_step, args.repeats)
  return rate, spread, n


def host_peak_rss() -> int:
  """This process's peak resident set size in bytes."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------------- JAX side


def jax_matmul_peak(dtype: str, n: int, repeats: int) -> float:
  """Measured dense-matmul FLOP/s of one n x n @ n x n product in dtype (fp32 accumulate for bf16 inputs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  mm(a, b).block_until_ready()
  return median_rate(lambda: mm(a, b).block_until_ready(), 2 * n ** 3, repeats)[0]


def unet_fields(preset: str, precision: str = "fp32") -> dict[str, Any]:
  """Every field of the preset's UNet as a plain dict (what the PyTorch peer is built from)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from ddpm_jax.unet import UNet, unet_preset  # pylint: disable=g-import-not-at-top

  model = unet_preset(preset, dtype=PRECISIONS[precision])
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(UNet) if f.name not in ("parent", "name")}


def jax_forward_cost(preset: str, precision: str, size: int) -> tuple[int, float]:
  """(parameter count, forward FLOPs per image counting the taps in the padding, as PyTorch does) of the JAX
  preset, from shapes alone (nothing runs)."""
  import jax  # pylint: disable=g-import-not-at-top

  from ddpm_jax.train_state import init_params  # pylint: disable=g-import-not-at-top
  from ddpm_jax.unet import count_params, unet_preset  # pylint: disable=g-import-not-at-top

  model = unet_preset(preset, dtype=PRECISIONS[precision])
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1, size, size, 3)))
  return count_params(params), float(flops.forward_flops(model, (1, size, size, 3), count_padding=True))


def on_device(run: Callable[..., Any]) -> Callable[..., Any]:
  """run with host-to-device copies refused: every timed program reads arguments already on the devices."""
  import jax  # pylint: disable=g-import-not-at-top

  def guarded(*args: Any) -> Any:
    with jax.transfer_guard_host_to_device("disallow"):
      return run(*args)
  return guarded


def jax_bench(preset: str, batch: int, precision: str, args: argparse.Namespace,
              keep: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """JAX numbers for one configuration: the train step as train.py runs it on one device, with the DDPM paper's
  CIFAR-10 recipe (AdamW without decay, lr 2e-4, clip 1, EMA 0.9999, L1, linear schedule); keep(numbers so far)
  after each phase. Parameters, inputs and keys are on the devices and passed as arguments to every timed program
  (none uploaded per call, none compiled in as constants)."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax import parallel, sampling, training  # pylint: disable=g-import-not-at-top
  from ddpm_jax.schedule import make_schedule  # pylint: disable=g-import-not-at-top
  from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top
  from ddpm_jax.unet import count_params, unet_preset  # pylint: disable=g-import-not-at-top

  size = args.image_size or PRESET_SIZES[preset]
  model = unet_preset(preset, dtype=PRECISIONS[precision], attention=args.attention)
  tx = training.make_optimizer(learning_rate=2e-4, total_steps=800_000, warmup_steps=5000, lr_schedule="constant",
                               optimizer="adamw", grad_clip_norm=1.0)
  schedule = make_schedule("linear", 1000)
  shape = (batch, size, size, 3)
  out: dict[str, Any] = {"attention": args.attention}

  progress("init", f"creating the {preset} train state")
  start = time.perf_counter()
  runner = parallel.make_runner(functools.partial(training.train_step, schedule=schedule, ema_decay=0.9999),
                                args.parallelism)
  state = runner.put_state(create_train_state(model, tx, jax.random.key(0), (1, size, size, 3),
                                              runner.state_shardings))
  jax.block_until_ready(state)
  out["init_s"] = time.perf_counter() - start
  out["params"] = count_params(state.params)
  keep(out)
  progress("init", f"done in {out['init_s']:.1f} s ({out['params']:,} parameters)")
  # Counted analytically (benchmarks/flops.py) for the global batch, on whatever devices run it.
  out["train_flops_per_image"] = flops.train_flops(model, shape) / batch
  out["forward_flops_per_image"] = flops.forward_flops(model, shape) / batch

  x = runner.put_batch(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
  key = jax.random.key(1)
  progress("compile", "compiling the train step")
  start = time.perf_counter()
  compiled = runner.step.lower(state, x, key).compile()
  out["train_compile_s"] = time.perf_counter() - start
  keep(out)
  progress("compile", f"done in {out['train_compile_s']:.1f} s")
  holder = [state]

  def train_run(n: int) -> None:
    s = holder[0]
    for _ in range(n):
      s, _ = compiled(s, x, key)
    jax.block_until_ready(s)
    holder[0] = s

  progress("train", "timing the train step")
  out["jax_train_images_per_s"], out["jax_train_spread"], out["train_steps_per_run"] = timed_steps(
      on_device(train_run), batch, args)
  keep(out)
  progress("train", f"{out['jax_train_images_per_s']:.4g} img/s (spread {out['jax_train_spread']:.1%}, "
           f"{args.repeats} runs of {out['train_steps_per_run']} steps)")
  params = jax.device_put(runner.get_state(holder[0]).params)
  apply_fn = model.apply
  x = jnp.asarray(np.asarray(x).reshape(shape))
  del holder[:], state

  # One forward pass of the network (sampling's unit of work).
  progress("forward", "compiling and timing one forward pass")
  fwd = jax.jit(lambda p, x, t: apply_fn({"params": p}, x, t))
  t = jnp.full((batch,), 500, jnp.int32)
  start = time.perf_counter()
  fwd_compiled = fwd.lower(params, x, t).compile()
  out["forward_compile_s"] = time.perf_counter() - start
  fwd_run = lambda n: [fwd_compiled(params, x, t) for _ in range(n)][-1].block_until_ready()
  out["jax_forward_images_per_s"], out["jax_forward_spread"], _ = timed_steps(on_device(fwd_run), batch, args)
  keep(out)
  progress("forward", f"{out['jax_forward_images_per_s']:.4g} img/s (spread {out['jax_forward_spread']:.1%}; "
           f"compile {out['forward_compile_s']:.1f} s)")

  # The lax.scan samplers, the parameters an argument of the program.
  sample_key = jax.random.key(2)
  for name, method, steps in (("ddim50", "ddim", 50), ("ddpm1000", "ddpm", 1000)):
    wanted = {"auto": args.device == "gpu" or preset == "tiny", "on": True, "off": False}[args.ddpm1000]
    if name == "ddpm1000" and not wanted:
      out[f"sample_{name}_images_per_s"] = out[f"sample_{name}_overhead"] = None
      progress(f"sample {name}", f"skipped (--ddpm1000={args.ddpm1000})")
      continue
    def draw(p: Any, key: jax.Array, method: str = method, steps: int = steps) -> jax.Array:
      return sampling.sample(lambda xt, tt: apply_fn({"params": p}, xt, tt), schedule, key, shape, method=method,
                             num_steps=steps, eta=1.0)
    run = functools.partial(lambda fn: fn(params, sample_key).block_until_ready(), jax.jit(draw))
    progress(f"sample {name}", "compiling and timing")
    start = time.perf_counter()
    run()
    out[f"sample_{name}_first_call_s"] = time.perf_counter() - start
    rate, out[f"sample_{name}_spread"] = median_rate(on_device(run), batch, args.sample_repeats if steps <= 50 else 1)
    out[f"sample_{name}_images_per_s"] = rate
    progress(f"sample {name}", f"{rate:.4g} img/s (first call {out[f'sample_{name}_first_call_s']:.1f} s)")
    # > 1: time beyond `steps` jitted forward passes (the sampler's own arithmetic and the scan).
    out[f"sample_{name}_overhead"] = (batch / rate) / (steps * batch / out["jax_forward_images_per_s"])
    keep(out)

  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    out["peak_memory_bytes"], out["memory_kind"] = host_peak_rss(), "host peak RSS (process, JAX part)"
  else:
    stats = dev.memory_stats() or {}
    out["peak_memory_bytes"], out["memory_kind"] = stats.get("peak_bytes_in_use"), "device peak bytes in use"
  return out


# --------------------------------------------------------------------------------------------------- PyTorch peer


def torch_peer(preset: str, size: int, device: str) -> Any:
  """The PyTorch model of the preset's architecture, or None when PyTorch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  import torch_unet  # beside this script  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  return torch_unet.UNet(unet_fields(preset), 3, size).to(device)


def check_peer(preset: str, batch: int, precision: str, args: argparse.Namespace) -> dict[str, Any]:
  """Before anything is timed: the peer must have the JAX preset's parameter count exactly and its forward FLOPs
  within FLOP_TOLERANCE of the analytic count (benchmarks/flops.py); raises RuntimeError otherwise."""
  del batch  # both counts are per image
  size = args.image_size or PRESET_SIZES[preset]
  jax_params, jax_flops = jax_forward_cost(preset, precision, size)
  out = {"params": jax_params}
  model = None if args.no_torch else torch_peer(preset, size, "cpu")
  if model is None:
    return out
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top

  import torch_unet  # pylint: disable=g-import-not-at-top

  n = torch_unet.count_params(model)
  if n != jax_params:
    raise RuntimeError(f"the PyTorch peer has {n} parameters, the JAX {preset} {jax_params}: not the same model")
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    model.eval()(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long))
  ratio = counter.get_total_flops() / jax_flops
  if abs(ratio - 1) > FLOP_TOLERANCE:
    raise RuntimeError(f"the PyTorch peer's forward FLOPs are {ratio:.3f} times the JAX {preset}'s: not the same "
                       f"model (tolerance {FLOP_TOLERANCE})")
  out["torch_forward_flops_per_image"], out["torch_flop_ratio"] = counter.get_total_flops(), ratio
  return out


def checked_peer(preset: str, batch: int, precision: str, args: argparse.Namespace) -> dict[str, Any]:
  """check_peer run in a child process, so that PyTorch's thread pool does not share the cores with the JAX timing
  that follows; raises RuntimeError with the child's reason when the check fails."""
  progress("peer", "checking the PyTorch peer's parameters and FLOPs against the JAX model's")
  argv = child_argv(args, preset, batch, precision, "") + ["--check_peer_only"]
  done = subprocess.run(argv, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError((done.stderr.strip().splitlines() or ["the peer check failed"])[-1])
  out = json.loads(done.stdout.strip().splitlines()[-1])
  progress("peer", f"torch forward FLOPs / JAX's: {out['torch_flop_ratio']:.4f}" if "torch_flop_ratio" in out
           else "no peer (--no_torch, or PyTorch is not installed): parameters counted only")
  return out


def torch_bench(preset: str, batch: int, precision: str, args: argparse.Namespace,
                compiled: bool = False) -> Optional[dict[str, Any]]:
  """The PyTorch peer's numbers (keys torch_*, or torch_compiled_* under torch.compile), or None when PyTorch is
  not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  device = "cuda" if args.device == "gpu" else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  size = args.image_size or PRESET_SIZES[preset]
  model = torch_peer(preset, size, device)
  fmt = torch.channels_last if args.torch_channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  net = torch.compile(model) if compiled else model  # the parameters (and so opt and ema) are model's
  name = "torch_compiled" if compiled else "torch"
  progress(name, f"timing the {'compiled' if compiled else 'eager'} PyTorch peer (the first step compiles)")
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
  abar = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).neg().add(1).cumprod(0).float().to(device)
  x0 = torch.rand(batch, 3, size, size, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
  out: dict[str, Any] = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
  start = time.perf_counter()

  def step():
    t = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn_like(x0)
    a = abar[t][:, None, None, None]
    with autocast():
      pred = net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t)
    loss = (pred.float() - noise).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)  # pylint: disable=protected-access

  def train_run(n: int) -> None:
    for _ in range(n):
      step()
    sync()

  model.train()
  train_run(1)  # compiles under torch.compile
  out[f"{name}_first_step_s"] = time.perf_counter() - start
  out[f"{name}_train_images_per_s"], out[f"{name}_train_spread"], _ = timed_steps(train_run, batch, args)
  model.eval()
  t = torch.full((batch,), 500, device=device)

  def fwd_run(n: int) -> None:
    with torch.no_grad(), autocast():
      for _ in range(n):
        net(x0, t)
    sync()

  fwd_run(1)
  out[f"{name}_forward_images_per_s"], out[f"{name}_forward_spread"], _ = timed_steps(fwd_run, batch, args)
  progress(name, f"train {out[f'{name}_train_images_per_s']:.4g} img/s, forward "
           f"{out[f'{name}_forward_images_per_s']:.4g} img/s")
  if device == "cuda":
    out[f"{name}_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  return out


# ----------------------------------------------------------------------------------------------------------- main


def run_one(preset: str, batch: int, precision: str, peak: float, args: argparse.Namespace,
            env: dict[str, Any]) -> dict[str, Any]:
  """Every number for one (preset, batch, precision), each written to --json (marked "complete": false until the
  last) as it is measured, so that a run cut short (gpu.sh's time limits) keeps what it measured."""
  import jax  # pylint: disable=g-import-not-at-top

  print(f"== {preset} batch {batch} {precision} on {args.device}", flush=True)
  res: dict[str, Any] = {"preset": preset, "batch": batch, "precision": precision, "devices": jax.device_count(),
                         "parallelism": args.parallelism if jax.device_count() > 1 else "jit",
                         "image_size": args.image_size or PRESET_SIZES[preset], "matmul_peak_flops_per_s": peak,
                         "device": str(jax.local_devices()[0].device_kind), **env}
  keep = lambda part: report.write_json({**res, **part, "complete": False}, args.json) if args.json else None
  res.update(checked_peer(preset, batch, precision, args))  # before any timing
  res.update(jax_bench(preset, batch, precision, args, keep))
  res["train_flops_per_s"] = res["train_flops_per_image"] * res["jax_train_images_per_s"]
  res["train_fraction_of_peak"] = res["train_flops_per_s"] / peak
  torch_res = None if args.no_torch else torch_bench(preset, batch, precision, args)
  res["torch_skipped"] = None if torch_res else ("--no_torch" if args.no_torch else "PyTorch is not installed")
  res.update(torch_res or {"torch_train_images_per_s": None, "torch_forward_images_per_s": None,
                           "torch_version": None})
  keep({})
  compiled_res = (torch_bench(preset, batch, precision, args, compiled=True)
                  if torch_res and args.torch_compile else None)
  res.update(compiled_res or {"torch_compiled_train_images_per_s": None, "torch_compiled_forward_images_per_s": None})
  ratio = lambda a, b: res[a] / res[b] if res.get(b) else None
  res["train_ratio"] = ratio("jax_train_images_per_s", "torch_train_images_per_s")
  res["forward_ratio"] = ratio("jax_forward_images_per_s", "torch_forward_images_per_s")
  res["compiled_train_ratio"] = ratio("jax_train_images_per_s", "torch_compiled_train_images_per_s")
  res["compiled_forward_ratio"] = ratio("jax_forward_images_per_s", "torch_compiled_forward_images_per_s")
  res["complete"] = True
  print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=None), flush=True)
  return res


def fmt(v: Any, spec: str = ".1f") -> str:
  """A table cell: '-' for None."""
  return "-" if v is None else format(v, spec)


def markdown(results: list[dict[str, Any]]) -> str:
  """The results as a Markdown table with the environment above it."""
  env = results[0]
  lines = [f"Device: {env['device']} ({env['platform']}, {env['cpu_count']} cores); jax {env['jax_version']}, "
           f"flax {env['flax_version']}, torch {env['torch_version'] or 'not run'}. Matmul peak "
           f"({env['matmul_n']}x{env['matmul_n']}), measured in each run: "
           + ", ".join(f"{r['preset']}/{r['precision']} {r['matmul_peak_flops_per_s'] / 1e12:.3f} TFLOP/s"
                       for r in results) + ".", "",
           "| preset | batch | precision | JAX train img/s (spread) | PyTorch train img/s eager / compiled | "
           "train ratio eager / compiled | JAX fwd img/s | PyTorch fwd img/s eager / compiled | "
           "fwd ratio eager / compiled | train GFLOP/img | train TFLOP/s | fraction of peak | "
           "DDIM-50 img/s | DDPM-1000 img/s | sampler overhead (DDIM-50) | peak memory MiB | compile s |",
           "|" + " --- |" * 17]
  for r in results:
    pair = lambda a, b, spec: f"{fmt(r.get(a), spec)} / {fmt(r.get(b), spec)}"  # pylint: disable=cell-var-from-loop
    lines.append(
        f"| {r['preset']} | {r['batch']} | {r['precision']} | {fmt(r['jax_train_images_per_s'], '.3g')} "
        f"({r['jax_train_spread']:.1%}) | "
        f"{pair('torch_train_images_per_s', 'torch_compiled_train_images_per_s', '.3g')} | "
        f"{pair('train_ratio', 'compiled_train_ratio', '.2f')} | {fmt(r['jax_forward_images_per_s'], '.3g')} | "
        f"{pair('torch_forward_images_per_s', 'torch_compiled_forward_images_per_s', '.3g')} | "
        f"{pair('forward_ratio', 'compiled_forward_ratio', '.2f')} | {r['train_flops_per_image'] / 1e9:.2f} | "
        f"{r['train_flops_per_s'] / 1e12:.3f} | {r['train_fraction_of_peak']:.3f} | "
        f"{fmt(r['sample_ddim50_images_per_s'], '.3g')} | {fmt(r['sample_ddpm1000_images_per_s'], '.3g')} | "
        f"{fmt(r['sample_ddim50_overhead'], '.2f')} | "
        f"{fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**20, '.0f')} | "
        f"{r['train_compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> dict[str, Any]:
  """The one configuration args names, measured in this process."""
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts: a GPU build must not take the work
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  if args.device == "gpu" and jax.default_backend() != "gpu":
    print(f"bench.py: error: --device gpu but JAX's backend is {jax.default_backend()!r}: install jax[cuda13] "
          "(or jax[cuda12])", file=sys.stderr)
    sys.exit(2)
  (preset,), (batch,), (precision,) = args.presets, args.batches, args.precisions
  n = 8192 if args.device == "gpu" else 2048
  peak = jax_matmul_peak(PRECISIONS[precision], n, args.repeats)
  print(f"matmul peak ({n}x{n}, {precision}): {peak / 1e12:.3f} TFLOP/s", flush=True)
  env = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
         "flax_version": flax.__version__, "optax_version": optax.__version__, "python": platform.python_version(),
         "matmul_n": n}
  return run_one(preset, batch, precision, peak, args, env)


def child_argv(args: argparse.Namespace, preset: str, batch: int, precision: str, json_path: str) -> list[str]:
  """This script's command line for one configuration, other options kept."""
  argv = [sys.executable, os.path.abspath(__file__), f"--preset={preset}", f"--batch={batch}",
          f"--precision={precision}", f"--json={json_path}", f"--device={args.device}",
          f"--repeats={args.repeats}", f"--steps={args.steps}", f"--sample_repeats={args.sample_repeats}",
          f"--ddpm1000={args.ddpm1000}", f"--image_size={args.image_size}", f"--parallelism={args.parallelism}",
          f"--min_run_s={args.min_run_s}", f"--attention={args.attention}"]
  return (argv + ["--no_torch"] * args.no_torch + ["--torch_channels_last"] * args.torch_channels_last +
          ["--torch_compile"] * args.torch_compile)


MEMORY_CASES = (("book64", 64), ("ddpm_cifar10", 128))  # the GPU batch sizes
MEMORY_DEVICES = (1, 4, 8)


def memory_rows() -> list[dict[str, Any]]:
  """XLA's per-device memory analysis of each MEMORY_CASES train step under jit and fsdp over MEMORY_DEVICES
  devices (this process must have been started with at least max(MEMORY_DEVICES) CPU devices)."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ddpm_jax import parallel, training  # pylint: disable=g-import-not-at-top
  from ddpm_jax.schedule import make_schedule  # pylint: disable=g-import-not-at-top
  from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top
  from ddpm_jax.unet import count_params, unet_preset  # pylint: disable=g-import-not-at-top

  tx = training.make_optimizer(learning_rate=2e-4, total_steps=800_000, warmup_steps=5000, lr_schedule="constant",
                               optimizer="adamw", grad_clip_norm=1.0)
  step_fn = functools.partial(training.train_step, schedule=make_schedule("linear", 1000), ema_decay=0.9999)
  rows = []
  for preset, batch in MEMORY_CASES:
    size = PRESET_SIZES[preset]
    model = unet_preset(preset)
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0), (1, size, size, 3)))
    key = jax.eval_shape(lambda: jax.random.key(0))
    for n in MEMORY_DEVICES:
      for mode in ("jit", "fsdp"):
        state_shardings, batch_sharding, replicated = parallel.mesh_layout(jax.devices()[:n], mode == "fsdp")
        shardings = state_shardings(abstract)
        x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=batch_sharding)
        start = time.perf_counter()
        compiled = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                           out_shardings=(shardings, replicated), donate_argnums=0).lower(
                               parallel.with_shardings(abstract, shardings), x, key).compile()
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        # Independently of XLA: the bytes of the state each device holds under these shardings.
        state_bytes = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                          for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)))
        row = {"preset": preset, "batch": batch, "devices": n, "mode": mode, "params": count_params(abstract.params),
               "state_bytes_per_device": int(state_bytes), "argument_bytes": m.argument_size_in_bytes,
               "temp_bytes": m.temp_size_in_bytes, "output_bytes": m.output_size_in_bytes,
               "alias_bytes": m.alias_size_in_bytes, "compile_s": seconds}
        print(json.dumps(row), flush=True)
        rows.append(row)
  return rows


def memory_markdown(rows: list[dict[str, Any]]) -> str:
  """The memory rows as a Markdown table."""
  mib = lambda b: f"{b / 2**20:,.0f}"
  lines = ["| preset | global batch | devices | mode | state MiB/device | XLA arguments MiB | XLA temporaries MiB | "
           "arguments + temporaries MiB | vs jit on as many devices |", "|" + " --- |" * 9]
  for r in rows:
    same = next(q for q in rows if (q["preset"], q["devices"], q["mode"]) == (r["preset"], r["devices"], "jit"))
    total = lambda q: q["argument_bytes"] + q["temp_bytes"]
    lines.append(f"| {r['preset']} | {r['batch']} | {r['devices']} | {r['mode']} | "
                 f"{mib(r['state_bytes_per_device'])} | "
                 f"{mib(r['argument_bytes'])} | {mib(r['temp_bytes'])} | {mib(total(r))} | "
                 f"{total(r) / total(same):.2f} |")
  return "\n".join(lines) + "\n"


def memory_main(args: argparse.Namespace) -> int:
  """--memory: measures in a child process with max(MEMORY_DEVICES) simulated CPU devices, then reports."""
  if os.environ.get("DDPM_JAX_MEMORY_CHILD"):
    os.environ["JAX_PLATFORMS"] = "cpu"
    print(json.dumps(memory_rows()), flush=True)
    return 0
  devices = f"--xla_force_host_platform_device_count={max(MEMORY_DEVICES)}"
  env = dict(os.environ, DDPM_JAX_MEMORY_CHILD="1", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {devices}")
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory"], env=env, capture_output=True,
                        text=True, check=False)
  if done.returncode:
    print(done.stderr[-3000:], file=sys.stderr)
    print(f"bench.py: error: the memory analysis failed with exit code {done.returncode}", file=sys.stderr)
    return 1
  rows = json.loads(done.stdout.strip().splitlines()[-1])
  table = memory_markdown(rows)
  report.publish(table, rows, args.json, args.markdown)
  return 0


def main(argv: list[str]) -> int:
  """Measures every requested configuration (each in a fresh process, so peak memory is its own) and reports."""
  args = parse_args(argv)
  if args.memory:
    return memory_main(args)
  if args.check_peer_only:
    (preset,), (batch,), (precision,) = args.presets, args.batches, args.precisions
    print(json.dumps(check_peer(preset, batch, precision, args)))
    return 0
  configs = [(p, b, q) for p in args.presets for b in args.batches for q in args.precisions]
  if len(configs) == 1:
    results = [measure(args)]
  else:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
      for i, config in enumerate(configs):
        path = os.path.join(tmp, f"{i}.json")
        done = subprocess.run(child_argv(args, *config, path), check=False)
        if done.returncode:
          print(f"bench.py: error: the run for {config} failed with exit code {done.returncode}", file=sys.stderr)
          return 1
        with open(path, encoding="utf-8") as f:
          results.append(json.load(f))
  table = markdown(results)
  report.publish(table, results[0] if len(results) == 1 else results, args.json, args.markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
