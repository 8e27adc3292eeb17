"""Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule", Eq. 6), Inception
features, and the on-disk cache of real-data statistics.

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

computed by ``torchmetrics.image.fid.FrechetInceptionDistance`` from the Gaussian fitted to the features of
real (r) and generated (g) images. Which features is part of the metric's name: ``fid_inception`` uses the
2048-d pool3 features of torch-fidelity's InceptionV3 (the network of the original TensorFlow FID);
``fid_classifier`` the penultimate layer of a digit classifier (:mod:`diffusion_lab.metrics.classifier`).

Inception weights: ``InceptionFeatures()`` lets torch-fidelity download them (torchmetrics' default, cached
by torch.hub); ``InceptionFeatures(weights_path=...)`` reads a local copy of
``weights-inception-2015-12-05-6726825d.pth`` for machines without internet access.

Real-data statistics (torchmetrics' state ``real_features_sum`` (d,), ``real_features_cov_sum`` (d, d),
``real_features_num_samples``, plus the (N, d) features that KID needs) depend only on the real images and
the extractor: :class:`RealStatsCache` stores them once per caller-chosen key (dataset / split / image size /
sample count) and extractor ``tag``, written atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3

from diffusion_lab.metrics.features import DualFeatureExtractor, check_uint8_images, to_rgb
from diffusion_lab.utils.fileio import atomic_write
from diffusion_lab.utils.progress import track

__all__ = [
    "InceptionFeatures",
    "RealStats",
    "RealStatsCache",
    "real_statistics",
    "make_fid",
    "iter_batches",
]

RealImages = Tensor | Callable[[], Tensor] | None  # uint8 (N, C, H, W), or a function loading them on demand


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class InceptionFeatures(DualFeatureExtractor):
    """uint8 images -> ``{"features": (N, 2048) pool3, "logits": (N, 1008) unbiased logits}`` of InceptionV3.

    The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's ``FeatureExtractorInceptionV3``
    with ``name="inception-v3-compat"``, fixed in eval mode): the network that
    ``FrechetInceptionDistance(feature=2048)`` builds, so values match torchmetrics' default FID. Inputs of
    any size are resized to 299 x 299 inside (bilinear, antialiased unless ``antialias=False``, which
    reproduces torch-fidelity's TF1-style resize).
    Grey images are repeated to three channels.

    Args:
        weights_path: a local InceptionV3 state dict; None downloads torch-fidelity's converted TF weights.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, antialias: bool = True):
        super().__init__()
        if weights_path is not None:
            weights_path = Path(weights_path).expanduser()
            if not weights_path.is_file():
                raise FileNotFoundError(
                    f"Inception weights {weights_path} not found; set metrics.inception_weights to a copy of "
                    "weights-inception-2015-12-05-6726825d.pth, or null to download it"
                )
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048", "logits_unbiased"],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
                antialias=antialias,
            )
        except (OSError, RuntimeError) as e:  # the download fails without network access
            if weights_path is not None:
                raise
            raise RuntimeError(
                f"could not obtain the InceptionV3 weights ({type(e).__name__}: {e}); offline, "
                "set metrics.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth"
            ) from e
        self.output_dims = {"features": 2048, "logits": 1008}
        source = "torch-fidelity" if weights_path is None else _file_digest(weights_path)
        self.tag = f"inception-v3-compat-{source}" + ("" if antialias else "-tfresize")

    def train(self, mode: bool = True) -> InceptionFeatures:
        super().train(False)
        return self

    @torch.no_grad()
    def compute_outputs(self, x: Tensor) -> dict[str, Tensor]:
        check_uint8_images(x, "Inception features")
        feats, logits = self.net._torch_fidelity_forward(to_rgb(x))  # resize to 299, (x - 128) / 128, network
        return {"features": feats.reshape(x.shape[0], -1), "logits": logits.reshape(x.shape[0], -1)}


@dataclass
class RealStats:
    """Everything the metrics need from the real images, for one extractor.

    Attributes:
        features_sum:     (d,) float64, sum of features (torchmetrics' ``real_features_sum``).
        features_cov_sum: (d, d) float64, sum of outer products (``real_features_cov_sum``).
        num_samples:      N.
        features:         (N, d) float32 features themselves (KID's ``real_features``).
        tag:              the extractor's tag.
    """

    features_sum: Tensor
    features_cov_sum: Tensor
    num_samples: int
    features: Tensor
    tag: str

    def to_dict(self) -> dict:
        return {
            "features_sum": self.features_sum,
            "features_cov_sum": self.features_cov_sum,
            "num_samples": self.num_samples,
            "features": self.features,
            "tag": self.tag,
        }


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", s).strip("_")[:120] or "stats"


class RealStatsCache:
    """Real-data statistics on disk: ``<root>/<key>__<tag>.pt``, written atomically (temp file + rename).

    The key is the caller's: it must change whenever the real images change, e.g.
    ``"mnist-test-28px-n10000"``. The extractor tag (network + weights digest) is appended here, so a
    retrained classifier or other Inception weights never reuse stale statistics.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def path(self, key: str, tag: str) -> Path:
        digest = hashlib.sha1(f"{key}\0{tag}".encode()).hexdigest()[:8]
        return self.root / f"{_safe_name(key)}__{_safe_name(tag)}__{digest}.pt"

    def load(self, key: str, tag: str) -> RealStats | None:
        path = self.path(key, tag)
        if not path.is_file():
            return None
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("tag") != tag:
            raise RuntimeError(
                f"real-statistics cache {path} belongs to extractor {d.get('tag')}, not {tag}; "
                "delete the file"
            )
        return RealStats(
            d["features_sum"], d["features_cov_sum"], int(d["num_samples"]), d["features"], d["tag"]
        )

    def save(self, key: str, stats: RealStats) -> Path:
        path = self.path(key, stats.tag)
        atomic_write(path, lambda f: torch.save(stats.to_dict(), f))
        return path


def iter_batches(x: Tensor, batch_size: int, device: torch.device | str, description: str = "features"):
    """Yield (B, C, H, W) slices of x moved to ``device``, with a progress bar on a terminal."""
    for i in track(range(0, x.shape[0], batch_size), description):
        yield x[i : i + batch_size].to(device)


def make_fid(extractor: DualFeatureExtractor, real: RealStats | None = None) -> FrechetInceptionDistance:
    """A torchmetrics FID on ``extractor``'s ``features`` output, its real state preloaded from ``real``.

    Built with ``sync_on_compute=False``: statistics are computed on one process (cached real statistics
    are the same on every rank, so summing them across processes would be wrong).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fid = FrechetInceptionDistance(
            feature=extractor.view("features"), reset_real_features=False, sync_on_compute=False
        )
    if real is not None:
        device = fid.real_features_sum.device
        fid.real_features_sum = real.features_sum.to(device=device, dtype=torch.float64)
        fid.real_features_cov_sum = real.features_cov_sum.to(device=device, dtype=torch.float64)
        fid.real_features_num_samples = torch.tensor(real.num_samples, dtype=torch.long, device=device)
    return fid


@torch.no_grad()
def real_statistics(
    extractor: DualFeatureExtractor,
    real: RealImages,
    *,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    cache: RealStatsCache | None = None,
    key: str | None = None,
) -> RealStats:
    """Statistics of the real images under ``extractor``: loaded from ``cache[key]`` when there, else computed
    (and saved there when ``cache`` and ``key`` are given).

    Args:
        real: uint8 (N, C, H, W), or a zero-argument function returning it (called only on a cache miss), or
            None when the statistics must come from the cache.
    """
    if cache is not None and key is not None:
        stats = cache.load(key, extractor.tag)
        if stats is not None:
            return stats
    if callable(real):
        real = real()
    if real is None:
        where = f"cache entry {cache.path(key, extractor.tag)}" if cache is not None and key else "cache"
        raise ValueError(f"no real images given and no {where}; pass the real uint8 images")
    check_uint8_images(real, "real images")
    fid = make_fid(extractor).to(device)
    feats = []
    for xb in iter_batches(real, batch_size, device, f"real features ({extractor.tag})"):
        fid.update(xb, real=True)  # one forward pass, shared with the next line
        feats.append(extractor.outputs(xb)["features"].float().cpu())
    extractor.forget()
    stats = RealStats(
        fid.real_features_sum.detach().cpu(),
        fid.real_features_cov_sum.detach().cpu(),
        int(fid.real_features_num_samples),
        torch.cat(feats),
        extractor.tag,
    )
    if cache is not None and key is not None:
        cache.save(key, stats)
    return stats
