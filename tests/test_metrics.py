"""Fréchet distance, KID, Inception score and the digits evaluator against closed forms and known cases."""

import jax
import numpy as np
import pytest
import scipy.linalg

from ddpm_jax import digits_eval, metrics


def test_frechet_distance_matches_scipy_and_the_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the textbook float64 formula
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
  # Diagonal covariances: ‖Δμ‖² + Σ (sqrt(a_i) − sqrt(b_i))² exactly.
  va, vb = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(closed, rel=1e-12)
  # A singular covariance (rank 3 of 16) stays real and finite.
  c = rng.normal(size=(d, 3))
  assert np.isfinite(metrics.frechet_distance(mu1, c @ c.T, mu2, s2))


def test_frechet_distance_of_samples_approaches_the_population_value():
  rng = np.random.default_rng(1)
  x = rng.normal(0.0, 1.0, size=(20000, 4))
  y = rng.normal(0.5, 2.0, size=(20000, 4))
  # Population value: 4·0.5² + 4·(1 − 2)² = 5; estimates of this size land within about 2%.
  assert metrics.frechet_distance_of(x, y) == pytest.approx(5.0, rel=0.03)
  assert metrics.frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-9)


def test_kid_is_unbiased_and_separates_distributions():
  rng = np.random.default_rng(2)
  same = [metrics.kernel_inception_distance(rng.normal(size=(500, 8)), rng.normal(size=(500, 8)), 5, 500, s)[0]
          for s in range(10)]
  # Unbiased: the mean over independent draws of the same law is ~0 (within 3 s.e.), negative values included.
  assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-4
  assert min(same) < 0 < max(same)
  shifted, _ = metrics.kernel_inception_distance(rng.normal(size=(500, 8)), rng.normal(0.5, 1, size=(500, 8)), 5, 500)
  assert shifted > 20 * np.std(same)


def test_inception_score_matches_hand_computed_values():
  # Two classes, p(y|x) = (3/4, 1/4) and (1/4, 3/4): p(y) = (1/2, 1/2) and each KL is 3/4 ln(3/2) + 1/4 ln(1/2),
  # so IS = (3/2)^(3/4) (1/2)^(1/4) = (27/16)^(1/4).
  soft = np.log([[3.0, 1.0], [1.0, 3.0]])
  assert metrics.inception_score(soft, splits=1) == pytest.approx(((27 / 16) ** 0.25, 0.0), rel=1e-12)
  # Sure but unbalanced, two of class 0 and one of class 1: p(y) = (2/3, 1/3), KLs ln(3/2), ln(3/2), ln 3, so
  # IS = ((3/2)^2 · 3)^(1/3) = 6.75^(1/3) (logits 50 apart: p(y|x) is 1 to e^-50).
  sure = np.array([[50.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
  assert metrics.inception_score(sure, splits=1)[0] == pytest.approx(6.75 ** (1 / 3), rel=1e-12)
  # Two splits, (the soft pair) and (two equal rows: IS 1): mean and std of (27/16)^(1/4) and 1.
  s = (27 / 16) ** 0.25
  got = metrics.inception_score(np.concatenate([soft, soft[:1], soft[:1]]), splits=2)
  assert got == pytest.approx(((s + 1) / 2, (s - 1) / 2), rel=1e-12)
  k = 10
  confident = np.eye(k)[np.arange(1000) % k] * 50.0  # sure and balanced: score -> K
  assert metrics.inception_score(confident)[0] == pytest.approx(k, rel=1e-6)
  assert metrics.inception_score(np.zeros((1000, k)))[0] == pytest.approx(1.0)  # uninformative: 1
  # Fewer samples than splits: one sample per split, and a single sample scores exp(KL(p ‖ p)) = 1.
  assert metrics.inception_score(confident[:4], splits=10) == pytest.approx((1.0, 0.0))


def test_extract_concatenates_batches():
  ex = lambda b: (b.reshape(len(b), -1), b.reshape(len(b), -1)[:, :2])
  feats, logits = metrics.extract(ex, [np.ones((3, 2, 2)), np.zeros((2, 2, 2))])
  assert feats.shape == (5, 4) and logits.shape == (5, 2)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  return digits_eval.load_or_train(str(tmp_path_factory.mktemp("clf")), seed=0)


def test_digits_evaluator_scores_real_digits_high_and_noise_near_zero(classifier, tmp_path):
  images, labels, perm = digits_eval.real_digits(0)
  held = images[perm[:digits_eval.HELD_OUT]]  # never seen in training
  real = digits_eval.evaluate(classifier, held)
  assert real["confident_fraction"] >= 0.9
  assert all(0.05 <= f <= 0.15 for f in real["class_fractions"])
  _, probs = digits_eval.classify(classifier, held)
  assert (probs.argmax(1) == labels[perm[:digits_eval.HELD_OUT]]).mean() >= 0.95
  noise = np.random.default_rng(0).uniform(-1, 1, (1000, 8, 8, 1)).astype(np.float32)
  bad = digits_eval.evaluate(classifier, noise)
  assert bad["confident_fraction"] <= 0.02
  assert bad["frechet_distance"] > 50 * bad["frechet_floor_real_vs_real"] > 50 * 0.5
  assert real["frechet_distance"] < 4 * real["frechet_floor_real_vs_real"]  # 300 held-out vs ~900: small-n bias
  assert "classified with confidence >= 0.9" in digits_eval.report(real)


def test_digits_of_an_rgb_model_are_judged_as_their_gray(classifier):
  # An RGB model of the digits (an imported RGB U-Net) is trained on the gray digits repeated to three channels; its
  # samples are judged as gray. The luma weights sum to 1 (float32 rounding), so repeated gray maps back to itself.
  images, _, perm = digits_eval.real_digits(0)
  gray = images[perm[:200]]
  rgb = np.repeat(gray, 3, axis=-1)
  features, probs = digits_eval.classify(classifier, gray)
  rgb_features, rgb_probs = digits_eval.classify(classifier, rgb)
  np.testing.assert_allclose(rgb_features, features, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rgb_probs, probs, atol=1e-5)
  # a colour image: its luma, not one of its channels
  colour = np.stack([gray[..., 0], -gray[..., 0], np.zeros_like(gray[..., 0])], axis=-1)
  luma = (0.299 - 0.587) * gray  # float64 reference
  np.testing.assert_allclose(digits_eval.classify(classifier, colour)[0], digits_eval.classify(classifier, luma)[0],
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"\[N, H, W, 1\] or \[N, H, W, 3\] images, got shape \(200, 8, 8, 2\)"):
    digits_eval.classify(classifier, rgb[..., :2])


@pytest.mark.optimized  # the bits of the module fixture's classifier, trained at the default settings
@pytest.mark.bitwise
def test_digits_classifier_is_seeded_and_cached(classifier, tmp_path):
  again = digits_eval.load_or_train(str(tmp_path), seed=0)  # trained afresh in another folder: same bits
  for a, b in zip(jax.tree_util.tree_leaves(classifier), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cached = tmp_path / "digits_classifier_seed0.msgpack"
  assert cached.exists()
  stamp = cached.stat().st_mtime_ns
  digits_eval.load_or_train(str(tmp_path), seed=0)
  assert cached.stat().st_mtime_ns == stamp  # loaded, not retrained
