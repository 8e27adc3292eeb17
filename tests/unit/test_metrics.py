"""Sanity checks of the sample-quality metrics: FID / KID / IS / class histogram, the real-statistics cache,
the classifier file format, and the Inception plumbing.

Data: scikit-learn's 8x8 digits (1,797 real handwritten digits), upsampled to 16x16 uint8. Features: a
small :class:`DigitClassifier` (width 8, 32-d features) trained here for 8 epochs on 1,400 of them (a few
seconds; about 97 % held-out accuracy); its features are what the classifier-feature metrics measure.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.metrics import (
    DigitClassifier,
    MetricSuite,
    RealStatsCache,
    compute_metrics,
    load_classifier,
    save_classifier,
    scalar_logs,
    uniformity,
)
from diffusion_lab.metrics.classifier import ClassifierConfig
from diffusion_lab.metrics.train_classifier import random_affine, train_classifier

SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small models run many times faster than with two threads on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (1797, 1, 16, 16), int64 (1797,)) from sklearn's digits, shuffled with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8) in [0, 255]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return x.round().clamp(0, 255).to(torch.uint8)[perm], torch.tensor(d.target, dtype=torch.long)[perm]


@pytest.fixture(scope="module")
def classifier(digits) -> DigitClassifier:
    x, y = digits
    model, acc = train_classifier(
        x[:1400],
        y[:1400],
        x[1400:],
        y[1400:],
        epochs=8,
        seed=0,
        width=8,
        feature_dim=32,
        augment=False,
        dataset="sklearn-digits",
        log=None,
    )
    assert acc > 0.9, f"the test classifier should learn sklearn digits, got {acc:.3f}"
    return model


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------
# FID on classifier features
# ------------------------------------------------------------------------------------------------------------


def test_fid_classifier_of_a_set_with_itself_is_zero(digits, classifier):
    x, _ = digits
    a, b = x[:800], x[800:1600]
    self_fid = compute_metrics(["fid_classifier"], a, a, classifier=classifier)["fid_classifier"]
    half_fid = compute_metrics(["fid_classifier"], b, a, classifier=classifier)["fid_classifier"]
    assert abs(self_fid) < 1e-3 * half_fid + 1e-4
    assert half_fid > 0


def test_fid_classifier_grows_monotonically_with_noise(digits, classifier):
    x, _ = digits
    a, b = x[:800], x[800:1600]
    suite = MetricSuite(["fid_classifier"], classifier=classifier)
    # A and B are two disjoint halves of the real set: only sampling noise separates them.
    fids = [
        suite.compute(_noisy(b, s) if s else b, a, cache_key="digits-A")["fid_classifier"]
        for s in (0, 16, 32, 64, 128)
    ]
    assert all(f1 < f2 for f1, f2 in zip(fids[:-1], fids[1:], strict=True)), fids
    assert fids[0] * 5 < fids[2], f"FID(A, B) should be far below FID(A, B + noise): {fids}"


# ------------------------------------------------------------------------------------------------------------
# KID, IS, class histogram
# ------------------------------------------------------------------------------------------------------------


def test_kid_of_a_set_with_itself_is_near_zero(digits, classifier):
    x, _ = digits
    a = x[:400]
    kw = dict(classifier=classifier, kid_subsets=20, kid_subset_size=200)
    self_kid = compute_metrics(["kid_classifier"], a, a, **kw)["kid_classifier"]
    noisy_kid = compute_metrics(["kid_classifier"], _noisy(a, 64), a, **kw)["kid_classifier"]
    assert noisy_kid > 0
    assert abs(self_kid) < 0.05 * noisy_kid, (self_kid, noisy_kid)


def test_class_histogram_counts_every_sample(digits, classifier):
    x, y = digits
    fake = x[1400:1700]
    out = compute_metrics(["class_histogram"], fake, classifier=classifier)
    hist = out["class_histogram"]
    assert hist.dtype == torch.long and hist.shape == (10,)
    assert int(hist.sum()) == fake.shape[0]
    with torch.no_grad():
        pred = classifier(fake.float() / 127.5 - 1.0).argmax(-1)
    assert torch.equal(hist, torch.bincount(pred, minlength=10))
    assert 0.9 < out["class_entropy"] <= 1.0  # real digits are close to uniform over the 10 classes
    logs = scalar_logs(out, prefix="val/")
    assert math.isclose(sum(v for k, v in logs.items() if k.startswith("val/class_frac/")), 1.0)


def test_uniformity_against_closed_forms():
    even = uniformity(torch.full((10,), 100))
    assert even == {"class_max_deviation": 0.0, "class_chi2_p": 1.0}
    # K = 2: chi^2 with 1 degree of freedom; counts 60/40 give chi^2 = 4, P(chi^2_1 >= 4) = erfc(sqrt(2))
    two = uniformity(torch.tensor([60, 40]))
    assert two["class_max_deviation"] == pytest.approx(0.2)
    assert two["class_chi2_p"] == pytest.approx(math.erfc(math.sqrt(2.0)), rel=1e-9)
    # K = 3: 2 degrees of freedom, P(chi^2_2 >= x) = exp(-x / 2); counts 50/30/20 of 100 give x = 14
    three = uniformity(torch.tensor([50, 30, 20]))
    assert three["class_max_deviation"] == pytest.approx(0.5)
    assert three["class_chi2_p"] == pytest.approx(math.exp(-7.0), rel=1e-9)
    # the histogram of issue 12's first unconditional model: zeros at 45 of 1000 miss uniform by 55%
    first = uniformity(torch.tensor([45, 88, 108, 150, 107, 109, 81, 104, 80, 128]))
    assert first["class_max_deviation"] == pytest.approx(0.55) and first["class_chi2_p"] < 1e-10


def test_inception_score_of_one_class_is_one_and_of_many_classes_is_large(digits, classifier):
    x, y = digits
    # A classifier that predicts class 3 with certainty for every input: p(y|x) = p(y), so IS = exp(0) = 1.
    constant = DigitClassifier(ClassifierConfig(image_size=SIZE, width=8, feature_dim=32)).eval()
    with torch.no_grad():
        constant.head[1].weight.zero_()
        constant.head[1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(3), 10) * 50.0)
    out = compute_metrics(["is_classifier", "class_histogram"], x[:200], classifier=constant, is_splits=4)
    assert abs(out["is_classifier"] - 1.0) < 1e-4
    assert out["class_histogram"].tolist() == [0, 0, 0, 200, 0, 0, 0, 0, 0, 0]
    assert out["class_entropy"] == 0.0
    assert out["class_max_deviation"] == 9.0 and out["class_chi2_p"] < 1e-100

    ones = x[y == 1][:100]
    one_class = compute_metrics(["is_classifier"], ones, classifier=classifier, is_splits=1)["is_classifier"]
    all_classes = compute_metrics(["is_classifier"], x[:1000], classifier=classifier, is_splits=1)
    assert one_class < 1.5
    assert all_classes["is_classifier"] > 5.0  # at most 10 = number of classes


# ------------------------------------------------------------------------------------------------------------
# Real-statistics cache
# ------------------------------------------------------------------------------------------------------------


def test_real_statistics_cache_loads_from_disk_and_gives_identical_fid(tmp_path, digits, classifier):
    x, _ = digits
    real, fake = x[:600], _noisy(x[600:900], 32)
    first = compute_metrics(
        ["fid_classifier", "kid_classifier"],
        fake,
        real,
        classifier=classifier,
        cache_dir=tmp_path,
        cache_key="digits-16px-n600",
        kid_subset_size=100,
    )
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and "digits-16px-n600" in files[0].name

    def must_not_load():
        raise AssertionError("real images were loaded although their statistics are cached")

    second = compute_metrics(
        ["fid_classifier", "kid_classifier"],
        fake,
        must_not_load,
        classifier=classifier,
        cache_dir=tmp_path,
        cache_key="digits-16px-n600",
        kid_subset_size=100,
    )
    assert second["fid_classifier"] == first["fid_classifier"]
    assert second["kid_classifier"] == first["kid_classifier"]

    stats = RealStatsCache(tmp_path).load(
        "digits-16px-n600", f"classifier-sklearn-digits-{classifier.fingerprint()}"
    )
    assert stats.num_samples == 600 and stats.features.shape == (600, 32)
    # Another classifier never reuses these statistics: its tag differs.
    other = DigitClassifier(
        ClassifierConfig(image_size=SIZE, width=8, feature_dim=32, dataset="sklearn-digits")
    )
    assert other.fingerprint() != classifier.fingerprint()
    with pytest.raises(ValueError, match="no real images"):
        compute_metrics(
            ["fid_classifier"], fake, None, classifier=other, cache_dir=tmp_path, cache_key="digits-16px-n600"
        )


# ------------------------------------------------------------------------------------------------------------
# Classifier file format, augmentation, input checks
# ------------------------------------------------------------------------------------------------------------


def test_classifier_save_load_round_trip(tmp_path, digits, classifier):
    x, _ = digits
    path = save_classifier(classifier, tmp_path / "clf" / "digits.pt")
    loaded = load_classifier(path)
    assert loaded.config == classifier.config
    assert loaded.config.accuracy is not None and loaded.config.extra["epochs"] == 8
    assert loaded.fingerprint() == classifier.fingerprint()
    xb = x[:32].float() / 127.5 - 1.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(xb), classifier(xb), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a diffusion_lab classifier"):
        load_classifier(tmp_path / "other.pt")


def test_random_affine_is_identity_without_randomness_and_keeps_shape(digits):
    x = digits[0][:16].float() / 255.0
    same = random_affine(x, max_degrees=0.0, scale=(1.0, 1.0), max_translate=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    moved = random_affine(x, generator=torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and 0 <= moved.min() and moved.max() <= 1
    assert not torch.allclose(moved, x)


def test_bad_inputs_fail_with_a_clear_message(digits, classifier):
    x, _ = digits
    with pytest.raises(ValueError, match="unknown metric"):
        MetricSuite(["fid"])
    with pytest.raises(ValueError, match="expected uint8"):
        compute_metrics(["fid_classifier"], x[:10].float(), x[:10], classifier=classifier)
    with pytest.raises(ValueError, match="need a digit classifier"):
        compute_metrics(["fid_classifier"], x[:10], x[:10])
    with pytest.raises(ValueError, match="trained on"):
        compute_metrics(
            ["class_histogram"], torch.zeros(4, 1, 28, 28, dtype=torch.uint8), classifier=classifier
        )


# ------------------------------------------------------------------------------------------------------------
# Inception (plumbing only)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised InceptionV3 state dict in a temporary file (real weights need the internet)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # variance-preserving init, so features neither vanish nor explode
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_metrics_run_end_to_end_with_local_weights(tmp_path, digits, random_inception_weights):
    """Plumbing only: random (untrained) InceptionV3 weights; the values mean nothing beyond these properties.

    Checks that a weights file is loaded (no download), grey 16x16 uint8 images reach the 299x299 network,
    and FID / KID / IS come back finite, with FID of a set against itself ~0, and that cached statistics load.
    """
    x, _ = digits
    real, other = x[:3], x[3:5]  # 8 forward passes in all: Inception runs at 299 x 299, slow on a CPU
    suite = MetricSuite(
        ["fid_inception", "kid_inception", "is_inception"],
        inception_weights=random_inception_weights,
        batch_size=4,
        cache_dir=tmp_path,
    )
    same = suite.compute(real, real, cache_key="digits-3")
    assert all(math.isfinite(v) for v in same.values()), same
    assert abs(same["is_inception"] - 1.0) < 1e-4  # 3 splits of one image each: every split scores exp(0) = 1
    assert list(tmp_path.glob("digits-3__inception-v3-compat-*.pt"))
    diff = suite.compute(other, None, cache_key="digits-3")  # real statistics from the cache
    assert diff["fid_inception"] > 0
    assert abs(same["fid_inception"]) < 1e-3 * diff["fid_inception"], (same, diff)
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        compute_metrics(["fid_inception"], real, real, inception_weights=tmp_path / "absent.pth")


def test_guidance_sweep_within_class_spread():
    """experiments/guidance: a class's spread is its members' mean distance to their mean (nan when < 2)."""
    from experiments.guidance import class_spread

    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [3.0, 4.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    spread = class_spread(feats, labels, 4)
    assert torch.allclose(spread[:2], torch.tensor([1.0, 2.5]))
    assert spread[2:].isnan().all()


def test_edm_vs_ddpm_reference_is_a_random_subset_of_a_class_sorted_split():
    """The real-image reference row draws across the split, not its first n (Hoda's test split is sorted)."""
    from experiments.edm_vs_ddpm import random_subset

    labels = torch.arange(10).repeat_interleave(200)  # sorted by class, as stored
    images = labels.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    pick = random_subset(images, 1000, seed=0)
    counts = torch.bincount(pick[:, 0, 0, 0], minlength=10)
    assert len(pick) == 1000 and (counts > 60).all() and (counts < 140).all(), counts.tolist()
    assert len(torch.unique(pick[:, 0, 0, 0])) == 10
    assert torch.equal(pick, random_subset(images, 1000, seed=0)), "seeded"
