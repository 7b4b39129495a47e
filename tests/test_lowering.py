"""Every program the library compiles lowers for NVIDIA GPUs and TPUs (jax.export from this CPU): the state's
initialiser and the train step in each placement but pmap (which cannot be exported), the sampler of each method as
the generator runs it and the likelihood bound as its evaluator runs it; a class-conditional model's train step,
guided sampler and bound too. None holds float64 or a custom call outside ALLOWED_CUSTOM_CALLS."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, python_path, xla_flags
PLATFORMS = ("cuda", "tpu")
# Custom calls a program may hold on every platform: none so far (sharding is expressed by Shardy's own ops).
ALLOWED_CUSTOM_CALLS = set()

EXPORT_ALL = textwrap.dedent("""
    import json, re, sys
    import jax, numpy as np
    from jax import export
    import configs.default as default_config
    from ddpm_jax import builders, parallel, sampling
    from ddpm_jax.train_state import init_program

    platforms = tuple(sys.argv[1].split(","))
    assert jax.device_count() == 4
    report = {}

    def check(name, jitted, *args):
      exported = export.export(jitted, platforms=platforms)(*args)
      text = exported.mlir_module()
      report[name] = {"platforms": list(exported.platforms), "float64": bool(re.search(r"\\bf64\\b", text)),
                      "custom_calls": sorted(set(re.findall(r"stablehlo\\.custom_call @([\\w.$-]+)", text)))}

    abstract = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    for conditional in (False, True):
      c = default_config.get_config()
      c.model.base_channels, c.model.channel_mult, c.model.num_res_blocks, c.batch_size = 8, (1, 2), 1, 16
      c.model.num_classes = 10 if conditional else 0
      model, schedule, tx = builders.build_model(c), builders.build_schedule(c), builders.build_optimizer(c)
      key = jax.random.key(0)
      step = builders.build_train_step(c, schedule)
      batch = jax.ShapeDtypeStruct((16, 8, 8, 1), np.float32)
      if conditional:
        batch = (batch, jax.ShapeDtypeStruct((16,), np.int32))
      suffix = " conditional" if conditional else ""
      runners = [("single", parallel._single_runner(step))]  # what make_runner gives on one device
      if not conditional:  # the labels change the model, not how it is placed
        runners += [(mode, parallel.make_runner(step, mode)) for mode in ("jit", "fsdp")]
      for mode, runner in runners:
        program, key_data = init_program(model, tx, key, (1, 8, 8, 1), runner.state_shardings)
        state = jax.eval_shape(program, key_data)
        check(f"init {mode}{suffix}", program, abstract(key_data))
        jitted = runner.step if mode == "single" else runner.step.jitted_for(state)
        check(f"train step {mode}{suffix}", jitted, state, batch, jax.eval_shape(lambda: key))
      params = abstract(state.params)
      key_data = jax.ShapeDtypeStruct((2,), np.uint32)
      offsets = jax.ShapeDtypeStruct((4,), np.int32)
      labels = (jax.ShapeDtypeStruct((8,), np.int32),) if conditional else ()
      for method in (("dpmpp_2m",) if conditional else sampling.METHODS):
        options = builders.sampler_options(c, method=method, num_steps=None if method == "ddpm" else 4)
        generate = builders.build_generator(c, model, schedule, options, batch_size=8)
        check(f"sampler {method}{suffix}", generate.program(jax.random.key_impl(key), conditional), params,
              key_data, offsets, *labels)
      bound = builders.build_bound_evaluator(c, model, schedule, batch_size=8)  # split over the 4 devices
      check(f"bound{suffix}", bound.program(jax.random.key_impl(key), conditional), params, key_data, offsets,
            jax.ShapeDtypeStruct((8, 8, 8, 1), np.float32), *labels)
    json.dump(report, sys.stdout)
""")


@pytest.mark.slow
def test_every_program_lowers_for_gpu_and_tpu_without_float64_or_custom_calls():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path(), XLA_FLAGS=xla_flags(4))
  res = subprocess.run([sys.executable, "-c", EXPORT_ALL, ",".join(PLATFORMS)], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads(res.stdout)
  names = [f"{kind} {mode}" for kind in ("init", "train step") for mode in ("single", "jit", "fsdp")]
  names += ["init single conditional", "train step single conditional"]
  names += [f"sampler {m}" for m in ("ddpm", "ddim", "dpmpp_2m")] + ["sampler dpmpp_2m conditional"]
  names += ["bound", "bound conditional"]
  assert sorted(report) == sorted(names)
  for name, found in report.items():
    assert found["platforms"] == list(PLATFORMS), name
    assert not found["float64"], name
    assert set(found["custom_calls"]) <= ALLOWED_CUSTOM_CALLS, (name, found["custom_calls"])
