"""diffusers checkpoints in and out (ddpm_jax.pretrained, tools/import_diffusers.py, tools/export_diffusers.py), on
fixtures that tools/make_diffusers_fixture.py made once with diffusers: no PyTorch here."""

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ddpm_jax import checkpoint, pretrained
from ddpm_jax.train_state import init_params
from ddpm_jax.unet import UNet, count_params, unet_preset
from helpers import ROOT, python_path

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "diffusers")
# google/ddpm-cifar10-32's unet/config.json, the DDPM paper's CIFAR-10 model as published (its public values).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def fixture(name):
  return os.path.join(FIXTURES, name)


def one_line_error(call, *words):
  """Runs call(), expecting a one-line ValueError that contains every word."""
  with pytest.raises(ValueError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message and all(w in message for w in words), message
  return message


def copy_fixture(name, tmp_path):
  return shutil.copytree(fixture(name), tmp_path / name)


@pytest.mark.numerics
@pytest.mark.parametrize("folder, name, heads", [("pipeline", "ddpm", 1), ("heads", "heads", 2)])
def test_import_reproduces_diffusers_outputs(folder, name, heads):
  model, params = pretrained.from_diffusers(fixture(folder))
  assert model.num_heads == heads
  ref = np.load(fixture("outputs.npz"))
  x = jnp.asarray(ref["x"].transpose(0, 2, 3, 1))  # diffusers' NCHW -> NHWC
  with jax.default_matmul_precision("float32"):  # the same float32 function in two libraries: no TF32 / bf16
    out = np.asarray(jax.jit(model.apply)({"params": params}, x, jnp.asarray(ref["t"]))).transpose(0, 3, 1, 2)
  # The same float32 arithmetic in another order: differences of float32 rounding through ~20 layers (5e-7 seen;
  # 1.0e-3 and 7.5e-4 on an H200 at its default TF32 precision, 0.9e-3 and 1.05e-3 under tests/precision_sim.py's
  # TF32 rounding).
  assert np.abs(out - ref[name]).max() / np.abs(ref[name]).max() < 1e-5


def test_a_bin_with_the_older_attention_names_equals_its_safetensors_twin():
  _, from_bin = pretrained.from_diffusers(fixture("bin"))
  _, from_safetensors = pretrained.from_diffusers(fixture("pipeline"))
  assert jax.tree_util.tree_structure(from_bin) == jax.tree_util.tree_structure(from_safetensors)
  for a, b in zip(jax.tree_util.tree_leaves(from_bin), jax.tree_util.tree_leaves(from_safetensors)):
    np.testing.assert_array_equal(a, b)


def test_export_writes_what_diffusers_wrote_and_imports_back_exactly(tmp_path):
  model, params = pretrained.from_diffusers(fixture("heads"))
  pretrained.to_diffusers(model, params, str(tmp_path), image_size=8)
  assert pretrained.read_json(str(tmp_path / "config.json")) == pretrained.read_json(fixture("heads/config.json"))
  ours = safetensors.numpy.load_file(str(tmp_path / pretrained.SAFETENSORS))
  theirs = safetensors.numpy.load_file(fixture(f"heads/{pretrained.SAFETENSORS}"))
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  again, back = pretrained.from_diffusers(str(tmp_path))
  assert again == model
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_a_pipeline_exports_with_its_schedule_and_sampler_settings(tmp_path):
  settings = pretrained.diffusion_settings(fixture("pipeline"))
  assert settings == {"diffusion.schedule": "linear", "diffusion.num_timesteps": 1000, "diffusion.beta_start": 1e-4,
                      "diffusion.beta_end": 0.02, "diffusion.prediction": "eps", "sample.variance": "fixed_large",
                      "sample.clip_x0": True, "sample.timestep_spacing": "leading"}
  config = {"image_size": 8, "diffusion": {}, "sample": {}}
  for key, value in settings.items():
    section, name = key.split(".")
    config[section][name] = value
  model, params = pretrained.from_diffusers(fixture("pipeline"))
  pretrained.to_diffusers(model, params, str(tmp_path), schedule=config)
  assert pretrained.diffusion_settings(str(tmp_path)) == settings
  assert pretrained.read_json(str(tmp_path / "model_index.json")) == pretrained.read_json(
      fixture("pipeline/model_index.json"))
  # The Schedule: diffusers' linear betas from 1e-4 to 0.02 (np.linspace in float64, stored as float32).
  schedule = pretrained.schedule_from_diffusers(str(tmp_path))
  np.testing.assert_allclose(schedule.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)


def test_the_cifar10_checkpoint_config_is_the_papers_model_field_by_field():
  spec = pretrained.unet_spec(CIFAR10_CONFIG)
  assert (spec.image_size, spec.in_channels) == (32, 3)
  model, paper = unet_preset(pretrained.BASE_PRESET, **spec.fields), unet_preset("ddpm_cifar10")
  differ = {f.name: (getattr(model, f.name), getattr(paper, f.name)) for f in dataclasses.fields(UNet)
            if getattr(model, f.name) != getattr(paper, f.name)}
  assert differ == {"dropout": (0.0, 0.1)}  # the upload's config says no dropout; the paper trained with 0.1
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), (1, 32, 32, 3)))
  assert count_params(shapes) == 35_746_307
  # And back: our preset's diffusers config says what the upload's says, key by key.
  exported = pretrained.unet_config(paper, 32, 3)
  assert {k: exported[k] for k in CIFAR10_CONFIG if k != "_diffusers_version"} == {
      k: v for k, v in CIFAR10_CONFIG.items() if k != "_diffusers_version"}


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("block_out_channels"), ["lacks 'block_out_channels'"]),
    (lambda c: c["down_block_types"].__setitem__(1, "CrossAttnDownBlock2D"),
     ["down_block_types", "CrossAttnDownBlock2D"]),
    (lambda c: c.update(resnet_time_scale_shift="scale_shift"), ["resnet_time_scale_shift='scale_shift'"]),
    (lambda c: c.update(attention_head_dim=96), ["attention_head_dim=96"]),
    (lambda c: c.update(_class_name="UNet2DConditionModel"), ["_class_name='UNet2DConditionModel'"]),
])
def test_a_config_our_unet_cannot_express_is_refused_naming_the_field(change, words):
  config = copy.deepcopy(CIFAR10_CONFIG)
  change(config)
  one_line_error(lambda: pretrained.unet_spec(config), *words)


def test_an_unsupported_scheduler_setting_is_refused_naming_it(tmp_path):
  folder = copy_fixture("pipeline", tmp_path)
  path = folder / "scheduler" / pretrained.SCHEDULER_CONFIG
  path.write_text(json.dumps({**json.loads(path.read_text()), "variance_type": "learned_range"}))
  one_line_error(lambda: pretrained.schedule_from_diffusers(str(folder)), "variance_type='learned_range'")


@pytest.mark.parametrize("preset, overrides, field", [("book64", {}, "topology"),
                                                      ("tiny", {"attn_norm": "layer"}, "attn_norm")])
def test_a_unet_diffusers_cannot_express_is_not_exported(preset, overrides, field):
  model = unet_preset(preset, **overrides)
  one_line_error(lambda: pretrained.unet_config(model, 64, 3), f"UNet {field}=", "no diffusers UNet2DModel equivalent")


@pytest.mark.parametrize("folder, weights", [("pipeline/unet", pretrained.SAFETENSORS), ("bin", pretrained.TORCH_BIN)])
def test_a_truncated_weight_file_is_one_line(tmp_path, folder, weights):
  path = copy_fixture(folder, tmp_path) / weights
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  one_line_error(lambda: pretrained.from_diffusers(str(path.parent)), str(path), "cannot be read")


def test_a_missing_weight_is_named(tmp_path):
  folder = copy_fixture("heads", tmp_path)
  state = safetensors.numpy.load_file(str(folder / pretrained.SAFETENSORS))
  del state["mid_block.attentions.0.to_k.weight"]
  safetensors.numpy.save_file(state, str(folder / pretrained.SAFETENSORS))
  one_line_error(lambda: pretrained.from_diffusers(str(folder)), "lack mid_block.attentions.0.to_k.weight")


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval")])
def test_a_pickle_naming_another_callable_is_refused_and_nothing_runs(tmp_path, module, name):
  marker = tmp_path / "ran"
  argument = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
  # Protocol 2 by hand: GLOBAL module.name, one string argument as a 1-tuple, REDUCE (call), STOP.
  text = argument.encode()
  data = (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(text).to_bytes(4, "little") + text
          + b"\x85R.")
  folder = copy_fixture("bin", tmp_path)
  with zipfile.ZipFile(folder / pretrained.TORCH_BIN, "w") as archive:
    archive.writestr("archive/data.pkl", data)
    archive.writestr("archive/version", "3\n")
  one_line_error(lambda: pretrained.from_diffusers(str(folder)), f"names {module}.{name}", "refused")
  assert not marker.exists()


def run_tool(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path())
  return subprocess.run([sys.executable, os.path.join(ROOT, *script.split("/")), *args], env=env,
                        capture_output=True, text=True, timeout=600)


def test_the_import_tool_reports_a_damaged_folder_in_one_line_with_exit_2(tmp_path):
  folder = copy_fixture("pipeline", tmp_path)
  path = folder / "unet" / pretrained.SAFETENSORS
  path.write_bytes(path.read_bytes()[:100])
  res = run_tool("tools/import_diffusers.py", str(folder), f"--workdir={tmp_path / 'w'}")
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "cannot be read" in res.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_an_imported_workdir_samples_exports_and_fine_tunes(tmp_path):
  workdir, out, source = tmp_path / "w", tmp_path / "exported", tmp_path / "pipeline32"
  # The fixture's pipeline as a 32-pixel checkpoint, as google/ddpm-cifar10-32 is (a diffusers U-Net's weights do
  # not depend on its sample_size).
  shutil.copytree(fixture("pipeline"), source)
  unet_config = json.loads((source / "unet" / "config.json").read_text())
  (source / "unet" / "config.json").write_text(json.dumps({**unet_config, "sample_size": 32}))
  res = run_tool("tools/import_diffusers.py", str(source), f"--workdir={workdir}",
                 f"--config={ROOT}/configs/default.py")  # the digits dataset, converted to 32x32 RGB
  assert res.returncode == 0, res.stderr[-3000:]
  assert ("the checkpoint's shape replaces --config's image_size=8 by 32, data.channels=1 by 3: the dataset"
          in res.stderr), res.stderr
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["pretrained"]["source"] == str(source) and saved["sample"]["variance"] == "fixed_large"
  for method in ("ddpm", "ddim", "dpmpp_2m"):
    # with DDIM, also scored (the digits judge takes the RGB model's samples as gray) and the book's figures
    more = ["--eval", "--figures"] if method == "ddim" else []
    res = run_tool("sample.py", f"--workdir={workdir}", f"--method={method}", "--num_samples=2", *more,
                   f"--out={tmp_path}/{method}.png")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sampling 2 images in batches of 2 " in res.stdout  # not a batch of config.sample.batch_size (256)
    samples = np.load(tmp_path / f"{method}.npz")["images"]
    assert samples.shape == (2, 32, 32, 3) and samples.std() > 0
  assert json.loads((workdir / "eval_step_0.json").read_text())["num_samples"] == 2
  # The likelihood bound with the imported scheduler's variance: its parts add up to the total.
  res = run_tool("sample.py", f"--workdir={workdir}", "--nll=2")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "bound on 2 images (the training images of digits, which has no test split) in batches of 2 " in res.stdout
  bound = re.search(r"bits/dim: ([\d.]+) ± [\d.]+ over 2 images \(prior ([\d.]+) \+ decoder ([\d.]+) \+ KL terms "
                    r"([\d.]+); .*variance fixed_large\)", res.stdout)
  assert bound, res.stdout
  total, *parts = map(float, bound.groups())
  assert 0 < total and abs(total - sum(parts)) <= 2e-4  # each printed to 4 decimals
  assert all((tmp_path / f"ddim_{name}.png").exists() for name in ("forward", "ten", "trajectory"))
  # The step-0 checkpoint's EMA parameters go back out as diffusers wrote them.
  res = run_tool("tools/export_diffusers.py", f"--workdir={workdir}", f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  ours = safetensors.numpy.load_file(str(out / "unet" / pretrained.SAFETENSORS))
  theirs = safetensors.numpy.load_file(fixture(f"pipeline/unet/{pretrained.SAFETENSORS}"))
  assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
  # Fine-tuning resumes from the imported weights: two steps early in the warmup (learning rates 0, then 5e-7) move
  # them little.
  res = run_tool("train.py", f"--config={ROOT}/configs/pretrained.py:{workdir}", f"--workdir={workdir}",
                 "--stop_at_step=2", "--config.batch_size=4", "--config.sample.every_steps=0",
                 "--config.optim.learning_rate=1e-4")
  assert res.returncode == 0, res.stderr[-3000:]
  manager = checkpoint.make_manager(str(workdir), create=False)
  try:
    _, imported = pretrained.from_diffusers(fixture("pipeline"))
    tuned = checkpoint.restore_params(manager, imported, 2, ema=False)
  finally:
    manager.close()
  change = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree_util.tree_leaves(tuned),
                                                                     jax.tree_util.tree_leaves(imported)))
  # Adam moves each parameter by at most about the learning rate, 1e-4 / 200 warmup steps = 5e-7, per step.
  assert 0 < change < 1e-5
