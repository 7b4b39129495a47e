"""The FID Inception-v3: its size, the weight converter, FID plumbing on random weights, and parity with pytorch-fid."""

import pathlib

import jax
import numpy as np
import pytest

from ddpm_jax import inception

BATCH = 8  # one shape for every forward pass in this file: one compile


def torch_layout(variables: dict) -> dict:
  """The state dict torchvision's naming would give these variables (written here independently of the converter)."""
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, value in flat:
    collection, *mods, leaf = [p.key for p in path]
    prefix = ".".join(mods)
    if mods == ["fc"]:
      out[f"fc.{'weight' if leaf == 'kernel' else 'bias'}"] = value.T if leaf == "kernel" else value
    elif leaf == "kernel":
      out[f"{prefix}.weight"] = np.transpose(value, (3, 2, 0, 1))
    else:
      name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
      out[f"{prefix}.{name}"] = value
      if leaf == "mean":
        out[f"{prefix}.num_batches_tracked"] = np.array(0)
  return out


def test_parameter_count_is_torchvisions_without_the_aux_head_with_1008_classes():
  # torchvision's inception_v3 has 27,161,264 parameters; its aux head holds 128·768 + 256 + 768·128·25 + 1,536
  # + 768·1000 + 1000 = 3,326,696, and the FID graph's fc has 1008 outputs: 8·2048 + 8 more.
  params = inception.template()["params"]
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 27_161_264 - 3_326_696 + 8 * 2048 + 8


def test_converter_maps_torch_layout_and_rejects_other_files(tmp_path, inception_variables):
  variables = inception_variables
  state = torch_layout(variables)
  state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # torchvision checkpoints carry it: ignored
  converted = inception.from_torch_state_dict(state)
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  path = str(tmp_path / "w.msgpack")
  inception.save_variables(converted, path)
  for a, b in zip(jax.tree.leaves(inception.load_variables(path)), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)

  state["Mixed_7c.branch1x1.conv.weight"] = np.zeros((320, 2048, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"Mixed_7c/branch1x1/conv/kernel has shape \(3, 3, 2048, 320\)"):
    inception.from_torch_state_dict(state)
  del state["Mixed_7c.branch1x1.conv.weight"]
  with pytest.raises(ValueError, match="1 missing"):
    inception.from_torch_state_dict(state)
  with pytest.raises(ValueError, match="unexpected tensor 'layer1.0.weight'"):
    inception.from_torch_state_dict({"layer1.0.weight": np.zeros(3)})
  (tmp_path / "junk").write_bytes(b"\x00not msgpack")
  with pytest.raises(ValueError, match="not a msgpack weight file"):
    inception.load_variables(str(tmp_path / "junk"))
  with pytest.raises(ValueError, match="is not a file"):
    inception.load_variables(str(tmp_path / "absent.msgpack"))


@pytest.mark.optimized  # the Inception network on hundreds of images
def test_fid_is_zero_for_the_same_images_and_grows_with_a_shift(tmp_path, inception_variables):
  extractor = inception.make_extractor(inception_variables)
  rng = np.random.default_rng(0)
  smooth = lambda n: np.tanh(rng.normal(size=(n, 4, 4, 3)).repeat(4, 1).repeat(4, 2)).astype(np.float32)
  real = smooth(2 * BATCH)
  fingerprint = "random-weights"
  cache = str(tmp_path / "stats.npz")
  ref = inception.cached_reference(cache, lambda: inception.reference_features(
      extractor, inception.batches(real, BATCH), BATCH), fingerprint)
  assert ref["features"].shape == (BATCH, inception.FEATURES)
  same = inception.score(extractor, real[:BATCH], ref, BATCH)
  shifted = [inception.score(extractor, np.clip(real[:BATCH] + s, -1, 1), ref, BATCH)["fid"] for s in (0.25, 0.5)]
  trace = np.trace(ref["sigma"])
  # The same 8 images: FID is 0 up to float64 rounding (measured 2e-15 on a trace of 7.4; 1e-12 of it allowed).
  assert abs(same["fid"]) < 1e-12 * trace
  # Brightening the same images moves them away, further for the larger shift (measured 1.42 and 3.91 here).
  assert 0.01 * trace < shifted[0] < shifted[1]
  assert 1.0 <= same["inception_score"] <= inception.CLASSES
  # The cache serves later calls with the same weights and is rebuilt for other weights.
  fail = lambda: pytest.fail("the cached statistics were recomputed")
  np.testing.assert_array_equal(inception.cached_reference(cache, fail, fingerprint)["mu"], ref["mu"])
  rebuilt = inception.cached_reference(cache, lambda: ref["features"][:4], "other-weights")
  assert rebuilt["features"].shape == (4, inception.FEATURES)


def test_matches_pytorch_fid_on_the_same_random_weights():
  """Parity with pytorch-fid's own FID Inception (needs torch, torchvision and pytorch-fid: requirements-bench.txt)."""
  why = "needs torch, torchvision and pytorch-fid (pip install -r requirements-bench.txt)"
  torch = pytest.importorskip("torch", reason=why)
  torchvision = pytest.importorskip("torchvision", reason=why)
  fid_inception = pytest.importorskip("pytorch_fid.inception", reason=why)

  torch.manual_seed(0)
  net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=True)
  for name, block, args in (("Mixed_5b", "A", (192, 32)), ("Mixed_5c", "A", (256, 64)), ("Mixed_5d", "A", (288, 64)),
                            ("Mixed_6b", "C", (768, 128)), ("Mixed_6c", "C", (768, 160)),
                            ("Mixed_6d", "C", (768, 160)), ("Mixed_6e", "C", (768, 192)),
                            ("Mixed_7b", "E_1", (1280,)), ("Mixed_7c", "E_2", (2048,))):
    setattr(net, name, getattr(fid_inception, f"FIDInception{block}")(*args))
  for m in net.modules():  # non-trivial batch norms, so a wrong mean/var mapping shows
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.1, 0.1)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.1, 0.1)
  net.eval()
  original = fid_inception.fid_inception_v3
  fid_inception.fid_inception_v3 = lambda: net
  try:
    wrapper = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  finally:
    fid_inception.fid_inception_v3 = original
  images = np.random.default_rng(1).uniform(0, 1, (4, 3, 40, 40)).astype(np.float32)
  with torch.no_grad():
    want = wrapper(torch.from_numpy(images))[0].reshape(4, -1).numpy()
  variables = inception.from_torch_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
  with jax.default_matmul_precision("float32"):  # the same float32 function in two libraries: no TF32 / bf16
    got, _ = inception.features(variables, np.transpose(images, (0, 2, 3, 1)) * 2 - 1)
  # float32 through 94 convolutions in two libraries: docs/evaluation.md's bound, 1e-5 of the feature scale (measured
  # 1.8e-7 at scale 0.54, 3.3e-7 of it, on one machine; 30 times that for other CPUs' and libraries' summation orders).
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.bitwise
def test_evaluate_samples_scores_a_folder_dataset_against_cached_statistics(tmp_path, inception_weights):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from configs import cifar10  # pylint: disable=g-import-not-at-top
  from ddpm_jax import builders, evaluation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  real = rng.integers(0, 256, (BATCH, 4, 4, 3), dtype=np.uint8).repeat(4, 1).repeat(4, 2)
  (tmp_path / "images").mkdir()
  for i, image in enumerate(real):
    Image.fromarray(image).save(tmp_path / "images" / f"{i:02d}.png")
  config = cifar10.get_config()
  config.update(dict(dataset=f"folder:{tmp_path / 'images'}", image_size=16, eval_batch_size=BATCH,
                     fid_num_real=10 * BATCH, inception_weights=None, eval_every_steps=100))
  with pytest.raises(ValueError, match="no Inception weights given: set config.inception_weights"):
    builders.validate(config)
  config.inception_weights = inception_weights

  # The real images, shuffled, scored as samples: FID 0 (so samples and reference see the same pixel scaling).
  samples = rng.permutation(real).astype(np.float32) / 127.5 - 1
  evaluate = builders.build_evaluator(config, str(tmp_path / "run"))
  result = evaluate(samples)
  stats_dir = pathlib.Path(inception_weights).parent / "fid_stats"  # beside the weights
  [stats] = stats_dir.glob(f"folder_*_images_train_16px_3ch_{BATCH}.npz")
  assert (result["evaluator"], result["num_samples"], result["num_real"]) == ("inception", BATCH, BATCH)
  # Real images through tf.data vs the same uint8 values scaled here: equal up to float32 rounding of the pixels.
  assert abs(result["fid"]) < 1e-6 * np.trace(np.load(stats)["sigma"])
  assert "FID" in evaluation.report(result)
  mtime = stats.stat().st_mtime_ns
  # Samples off the 8-bit grid by less than half a level are scored as the PNGs they would be saved as.
  assert evaluate(samples + 0.4 / 127.5)["fid"] == result["fid"]
  assert stats.stat().st_mtime_ns == mtime  # served from the cache
