"""A small CNN digit classifier, its file format, and the feature extractor built on it.

The classifier serves three evaluation jobs on datasets where ImageNet features say little (MNIST, Hoda):

* its penultimate ``feature_dim``-d activations are the features of "classifier-feature FID" and KID,
* its logits give a classifier-based Inception Score (Salimans et al. 2016, Sec. 4),
* its argmax predictions give a class histogram of generated samples (a mode-collapse check).

Images enter as uint8 (N, C, H, W) in [0, 255] like every extractor in :mod:`diffusion_lab.metrics`; the
network itself works on float images in [-1, 1] (the diffusion data range).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.metrics.features import DualFeatureExtractor, check_uint8_images
from diffusion_lab.utils.fileio import atomic_write
from diffusion_lab.utils.media import to_unit_range

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "ClassifierFeatures",
    "save_classifier",
    "load_classifier",
    "class_histogram",
]


@dataclass
class ClassifierConfig:
    """Architecture and provenance of a :class:`DigitClassifier` (saved beside its weights).

    ``image_size``/``channels`` are the data it was trained on; inputs of another shape are refused.
    """

    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    width: int = 32  # channels of the first conv block; doubled per block
    feature_dim: int = 128  # size of the penultimate layer used for classifier-feature FID / KID
    dropout: float = 0.3
    dataset: str = "unknown"
    accuracy: float | None = None  # test accuracy in [0, 1] measured after training
    extra: dict[str, Any] = field(default_factory=dict)  # epochs, seed, split sizes, training seconds, ...


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitClassifier(nn.Module):
    """Three conv-BN-ReLU blocks with max pooling, a ``feature_dim`` penultimate layer, dropout.

    Shapes for a 28x28 grey input (``width = w``; any size >= 12 works, the last pooling is adaptive)::

        x (N, 1, 28, 28) -> conv-BN-ReLU (N, w, 28, 28) -> maxpool (N, w, 14, 14)
          -> conv-BN-ReLU (N, 2w, 14, 14) -> maxpool (N, 2w, 7, 7)
          -> conv-BN-ReLU (N, 4w, 7, 7) -> adaptive maxpool (N, 4w, 3, 3) -> flatten (N, 36w)
          -> dropout -> linear-BN-ReLU (N, feature_dim) = features -> dropout -> linear (N, K) = logits
    """

    def __init__(self, config: ClassifierConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = config if config is not None else ClassifierConfig(**kwargs)
        c, w = self.config.channels, self.config.width
        self.body = nn.Sequential(
            _conv_block(c, w),
            nn.MaxPool2d(2),
            _conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_block(2 * w, 4 * w),
            nn.AdaptiveMaxPool2d(3),
            nn.Flatten(),
        )
        self.penultimate = nn.Sequential(
            nn.Dropout(self.config.dropout),
            nn.Linear(9 * 4 * w, self.config.feature_dim, bias=False),
            nn.BatchNorm1d(self.config.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Dropout(self.config.dropout), nn.Linear(self.config.feature_dim, self.config.num_classes)
        )

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, C, H, W) float in [-1, 1] -> (features (N, feature_dim), logits (N, num_classes))."""
        h = self.penultimate(self.body(x))
        return h, self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) float in [-1, 1] -> logits (N, num_classes)."""
        return self.features_and_logits(x)[1]

    def fingerprint(self) -> str:
        """A short hash of the weights and config: names cached real statistics of this exact network."""
        h = hashlib.sha1(repr(sorted(asdict(self.config).items())).encode())
        for name, t in self.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]


class ClassifierFeatures(DualFeatureExtractor):
    """uint8 images -> ``{"features": (N, feature_dim), "logits": (N, num_classes)}`` of a frozen classifier.


    The classifier is kept in eval mode (``train()`` does not reach it) and its parameters are frozen, so this
    module can sit inside a LightningModule without being trained or switching BatchNorm to batch statistics.
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        cfg = classifier.config
        self.output_dims = {"features": cfg.feature_dim, "logits": cfg.num_classes}
        self.tag = f"classifier-{cfg.dataset}-{classifier.fingerprint()}"

    def train(self, mode: bool = True) -> ClassifierFeatures:
        super().train(False)
        return self

    @torch.no_grad()
    def compute_outputs(self, x: Tensor) -> dict[str, Tensor]:
        cfg = self.classifier.config
        check_uint8_images(x, "classifier features")
        if x.shape[1] != cfg.channels or x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            raise ValueError(
                f"classifier features: images are {tuple(x.shape[1:])} but the classifier was trained on "
                f"({cfg.channels}, {cfg.image_size}, {cfg.image_size}) '{cfg.dataset}' images; "
                "train one for this dataset/image size (python -m diffusion_lab.metrics.train_classifier)."
            )
        feats, logits = self.classifier.features_and_logits(to_unit_range(x))
        return {"features": feats, "logits": logits}


@torch.no_grad()
def class_histogram(logits: Tensor, num_classes: int | None = None) -> Tensor:
    """Counts of argmax predictions: logits (N, K) -> int64 (K,) summing to N."""
    k = logits.shape[-1] if num_classes is None else num_classes
    return torch.bincount(logits.argmax(dim=-1).cpu(), minlength=k)


def save_classifier(model: DigitClassifier, path: str | os.PathLike) -> Path:
    """Write weights + :class:`ClassifierConfig` to ``path`` atomically (torch.save of plain containers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "diffusion_lab.DigitClassifier/1",
        "config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """Read a file written by :func:`save_classifier`: the network in eval mode, metadata in ``.config``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier file {path} not found; train one with `python -m diffusion_lab.metrics."
            "train_classifier dataset=<name>` or set metrics.classifier_path"
        )
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "diffusion_lab.DigitClassifier/1":
        raise ValueError(f"{path} is not a diffusion_lab classifier file (missing format tag); re-train it")
    model = DigitClassifier(ClassifierConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()
