"""The train_classifier command on real MNIST: one short epoch through the DataModule must exceed 90 %.

The full benchmark (> 98 % on MNIST and Hoda) is ``python -m experiments.classifier_accuracy``.
"""

from __future__ import annotations

import pytest

from diffusion_lab.api import compose_config
from diffusion_lab.metrics import load_classifier
from diffusion_lab.metrics.train_classifier import run


@pytest.mark.slow
@pytest.mark.data
def test_train_classifier_command_learns_mnist(shared_data, tmp_path):
    out = tmp_path / "mnist.pt"
    cfg = compose_config(
        "train_classifier",
        [
            "dataset=mnist",
            f"dataset.root={shared_data / 'mnist'}",
            "dataset.split=test",  # offline: the t10k file, 2,000 images held out for testing
            "dataset.val_fraction=0.2",
            "dataset.download=false",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "metrics.classifier_epochs=1",
            "metrics.classifier_threads=1",
            f"metrics.classifier_path={out}",
        ],
    )
    model, acc = run(cfg)
    assert acc > 0.90, f"one epoch on 8,000 MNIST digits should exceed 90 % test accuracy, got {acc:.4f}"
    loaded = load_classifier(out)
    assert loaded.config.dataset == "mnist" and loaded.config.image_size == 28
    assert loaded.config.accuracy == pytest.approx(acc)
    assert loaded.config.extra["n_train"] == 8000 and loaded.config.extra["n_test"] == 2000
