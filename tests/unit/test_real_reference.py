"""The real-statistics cache key (one function, with the data fingerprint) and the shared study reference."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.data import DiffusionDataModule
from diffusion_lab.metrics.classifier import ClassifierConfig, DigitClassifier, save_classifier
from diffusion_lab.metrics.reference import class_band, real_reference
from diffusion_lab.utils.media import to_unit_range


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _digits(cache, **kw):
    return DiffusionDataModule(name="digits", cache_dir=cache, **kw)


def test_the_key_names_the_images_it_was_computed_on(cache, monkeypatch):
    dm = _digits(cache)
    key = dm.real_stats_key("test")
    assert key.startswith("digits-test-16px-1ch-nall-")
    assert _digits(cache).real_stats_key("test") == key  # stable across instances and calls
    # another subset, another held-out slice, another size: another key
    assert dm.real_stats_key("test", 50).startswith("digits-test-16px-1ch-n50-")
    assert dm.real_stats_key("test", 50) != key
    assert _digits(cache, seed=1).real_stats_key("test") != key
    assert _digits(cache, val_fraction=0.1).real_stats_key("test") != key
    assert _digits(cache, image_size=8).real_stats_key("test") != key
    # other data files (the source's checksums): another key, although every name and size is the same
    other = _digits(cache)
    monkeypatch.setattr(other.source, "fingerprint", lambda part: "other files")
    assert other.real_stats_key("test") != key


def test_class_band_against_the_uniform_share():
    band = class_band([100] * 8 + [84, 116])  # shares 0.1 x 8, 0.084, 0.116 of 1,000
    assert band["shares"] == [0.1] * 8 + [0.084, 0.116]
    assert band["outside_band"] == [8, 9]  # 16% off the tenth on both sides
    assert band["max_relative_deviation"] == pytest.approx(0.16)
    inside = class_band([100] * 8 + [86, 114])
    assert inside["outside_band"] == [] and inside["max_relative_deviation"] == pytest.approx(0.14)


def test_real_reference_scores_against_every_test_image(cache, tmp_path):
    torch.manual_seed(0)
    clf = DigitClassifier(ClassifierConfig(image_size=16, width=8, feature_dim=16)).eval()
    path = save_classifier(clf, tmp_path / "digits.pt")
    cfg = OmegaConf.create(
        {
            "dataset": {
                "_target_": "diffusion_lab.data.DiffusionDataModule",
                "name": "digits",
                "cache_dir": str(cache),
            },
            "metrics": {"classifier_path": str(path), "cache_dir": str(tmp_path / "stats")},
        }
    )
    ref = real_reference(cfg)
    dm = _digits(cache)
    images, labels = dm.real_images("test")
    assert torch.equal(ref.images, images) and torch.equal(ref.labels, labels)
    assert ref.key == dm.real_stats_key("test")
    # the whole split against itself: FID 0, and the histogram is the classifier's on the real images
    whole = ref.score(images)
    assert whole["fid_classifier"] == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        predicted = torch.bincount(clf(to_unit_range(images)).argmax(1), minlength=10)
    assert whole["class_histogram"] == predicted.tolist()
    assert whole["class_band"]["shares"] == [round(float(c) / len(images), 4) for c in predicted]
    # the floor at n: n seeded real images, above zero (FID's small-sample bias), the same on a second call
    floor = ref.floor(30, seed=0)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:30]
    assert floor["fid_classifier"] == pytest.approx(ref.score(images[pick])["fid_classifier"], rel=1e-6)
    assert floor["fid_classifier"] > 100 * max(whole["fid_classifier"], 1e-9)
    assert ref.floor(30, seed=1)["fid_classifier"] != pytest.approx(floor["fid_classifier"], rel=1e-3)
    assert list((tmp_path / "stats").rglob(f"*{ref.key}*")), "the statistics are cached under the key"
