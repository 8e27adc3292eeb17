"""One entry point for sample-quality metrics: ``compute_metrics(names, fake, real)`` / :class:`MetricSuite`.

Metric names say which network supplies the features; a bare "FID" never appears:

    name              value                                                        needs
    ----------------  -----------------------------------------------------------  ---------------------------
    fid_inception     FID on InceptionV3 pool3 (2048-d)  (Heusel et al. 2017)     real images or cached stats
    kid_inception     KID on InceptionV3 pool3, cubic polynomial kernel MMD^2      real images or cached stats
                      (Binkowski et al. 2018)
    is_inception      Inception Score on InceptionV3 logits (Salimans et al. 2016) -
    fid_classifier    FID on the digit classifier's penultimate features          real, and a classifier
    kid_classifier    KID on the same features                                     real, and a classifier
    is_classifier     Inception Score on the classifier's logits (<= num_classes)  a classifier
    class_histogram   counts of the classifier's argmax over the fake samples,     a classifier
                      plus ``class_entropy`` = H(p)/log K in [0, 1] (1 = uniform),
                      ``class_max_deviation`` = max_k |K p_k - 1| (0.15: every class within
                      +-15% of uniform) and ``class_chi2_p``, the p-value of Pearson's
                      chi-square test of the counts against uniform

Results: floats under those names; KID and IS also give ``<name>_std`` (spread over subsets / splits);
``class_histogram`` is an int64 (K,) tensor summing to the number of fake samples. :func:`scalar_logs`
flattens a result dict into floats for a logger.

Example::

    suite = MetricSuite(["fid_classifier", "kid_classifier", "is_classifier", "class_histogram"],
                        classifier=".cache/classifiers/mnist.pt", cache_dir=".cache/metrics")
    results = suite.compute(fake_u8, real=lambda: dm.real_images("test")[0], cache_key="mnist-test-28-all")

All images are uint8 (N, C, H, W) in [0, 255], C in {1, 3}. The real statistics are computed once per
``cache_key`` and extractor and kept in memory and (with ``cache_dir``) on disk. KID subsets and IS splits
are drawn with a fixed ``seed``, so the same samples always give the same numbers.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from diffusion_lab.metrics.classifier import (
    ClassifierFeatures,
    DigitClassifier,
    class_histogram,
    load_classifier,
)
from diffusion_lab.metrics.features import DualFeatureExtractor, check_uint8_images
from diffusion_lab.metrics.fid import (
    InceptionFeatures,
    RealImages,
    RealStats,
    RealStatsCache,
    iter_batches,
    make_fid,
    real_statistics,
)

__all__ = ["METRIC_NAMES", "DISPLAY_NAMES", "MetricSuite", "compute_metrics", "scalar_logs", "uniformity"]

DISPLAY_NAMES = {
    "fid_inception": "FID (Inception-v3 pool3 features)",
    "kid_inception": "KID (Inception-v3 pool3 features)",
    "is_inception": "IS (Inception-v3 logits)",
    "fid_classifier": "FID (classifier features)",
    "kid_classifier": "KID (classifier features)",
    "is_classifier": "IS (classifier logits)",
    "class_histogram": "class histogram (classifier predictions)",
}
METRIC_NAMES = tuple(DISPLAY_NAMES)
_NEEDS_REAL = {"fid_inception", "kid_inception", "fid_classifier", "kid_classifier"}


def _family(name: str) -> str:
    """Which extractor a metric reads: "inception" or "classifier"."""
    return "inception" if name.endswith("_inception") else "classifier"


class MetricSuite:
    """The requested metrics, their feature extractors (built on first use) and the real statistics.

    Args:
        names: metric names from :data:`METRIC_NAMES`.
        classifier: a :class:`DigitClassifier` or the path of one saved by ``train_classifier``; needed by the
            ``*_classifier`` metrics and ``class_histogram``.
        inception_weights: local InceptionV3 weights for the ``*_inception`` metrics; None downloads them.
        cache_dir: directory of the on-disk real-statistics cache; None keeps them in memory only.
        batch_size: images per forward pass of the extractors.
        kid_subsets, kid_subset_size: KID's random subsets (subset size is capped at the sample counts).
        is_splits: IS splits (capped at the number of fake samples).
        seed: seeds KID's subsets and IS's split permutation (the global RNG is left untouched).
        device: where the extractors and metrics run.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        classifier: DigitClassifier | str | os.PathLike | None = None,
        inception_weights: str | os.PathLike | None = None,
        inception_antialias: bool = True,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 100,
        kid_subsets: int = 50,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        names = list(names)
        unknown = [n for n in names if n not in DISPLAY_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
        if not names:
            raise ValueError(f"no metrics requested; choose from {list(METRIC_NAMES)}")
        self.names = names
        self.classifier_source = classifier
        self.inception_weights = inception_weights
        self.inception_antialias = inception_antialias
        self.cache = RealStatsCache(cache_dir) if cache_dir is not None else None
        self.batch_size, self.seed = batch_size, seed
        self.kid_subsets, self.kid_subset_size, self.is_splits = kid_subsets, kid_subset_size, is_splits
        self.device = torch.device(device)
        self._extractors: dict[str, DualFeatureExtractor] = {}
        self._real: dict[tuple[str, str], RealStats] = {}

    @classmethod
    def from_config(cls, cfg: Mapping, device: str | torch.device = "cpu") -> MetricSuite:
        """Build from the ``metrics.`` config (conf/metric_suite/default.yaml); keys it lacks take the
        defaults of ``config_schema.MetricsConfig``, unknown keys and wrong types are refused in one line."""
        from diffusion_lab.config_schema import validate

        cfg = validate(cfg, "metrics")
        return cls(
            list(cfg.names),
            classifier=cfg.classifier_path,
            inception_weights=cfg.inception_weights,
            inception_antialias=cfg.inception_antialias,
            cache_dir=cfg.cache_dir,
            batch_size=cfg.batch_size,
            kid_subsets=cfg.kid_subsets,
            kid_subset_size=cfg.kid_subset_size,
            is_splits=cfg.is_splits,
            seed=cfg.seed,
            device=device,
        )

    # -- extractors -------------------------------------------------------------------------------------

    def extractor(self, family: str) -> DualFeatureExtractor:
        """The ``"classifier"`` or ``"inception"`` feature extractor, built (weights loaded) on first use."""
        if family not in self._extractors:
            if family == "classifier":
                src = self.classifier_source
                if src is None:
                    raise ValueError(
                        f"metrics {[n for n in self.names if _family(n) == 'classifier']} "
                        "need a digit classifier: train one with `python -m diffusion_lab.metrics."
                        "train_classifier dataset=<name>` and set metrics.classifier_path"
                    )
                model = src if isinstance(src, DigitClassifier) else load_classifier(Path(src))
                ext: DualFeatureExtractor = ClassifierFeatures(model)
            elif family == "inception":
                ext = InceptionFeatures(self.inception_weights, antialias=self.inception_antialias)
            else:
                raise ValueError(f"unknown extractor family {family}; choose classifier or inception")
            self._extractors[family] = ext.to(self.device)
        return self._extractors[family]

    def to(self, device: str | torch.device) -> MetricSuite:
        """Run on ``device`` from now on: built extractors move, later ones are built there (FID during
        training calls this with the module's device before every evaluation)."""
        self.device = torch.device(device)
        for ext in self._extractors.values():
            ext.to(self.device)
        return self

    # -- real statistics --------------------------------------------------------------------------------

    def real_stats(self, family: str, real: RealImages, cache_key: str | None) -> RealStats:
        """Real statistics for one extractor: memory, then disk cache, then computed from ``real``."""
        ext = self.extractor(family)
        mem_key = (cache_key, ext.tag)
        if cache_key is None or mem_key not in self._real:
            stats = real_statistics(
                ext, real, batch_size=self.batch_size, device=self.device, cache=self.cache, key=cache_key
            )
            if cache_key is None:
                return stats
            self._real[mem_key] = stats
        return self._real[mem_key]

    # -- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def compute(
        self, fake: Tensor, real: RealImages = None, cache_key: str | None = None
    ) -> dict[str, object]:
        """Evaluate the fake images.

        Args:
            fake: uint8 (N, C, H, W) generated samples.
            real: uint8 real images, a function returning them (called only when statistics are not cached),
                or None when ``cache_key`` names statistics already cached (or no metric needs real data).
                With a ``cache_key`` whose statistics exist (in memory or on disk), ``real`` is not used.
            cache_key: names the real set (dataset, split, size, count), e.g. ``"mnist-test-28-n10000"``;
                None computes real statistics afresh and caches nothing.
        Returns:
            dict of floats (and the ``class_histogram`` tensor); see the module docstring.
        """
        check_uint8_images(fake, "fake images")
        if callable(real) and cache_key is None:
            real = real()
        n_fake = fake.shape[0]
        out: dict[str, object] = {}
        for family in ("classifier", "inception"):
            wanted = [n for n in self.names if _family(n) == family]
            if wanted:
                out.update(self._compute_family(family, wanted, fake, real, cache_key, n_fake))
        return out

    def _compute_family(self, family, wanted, fake, real, cache_key, n_fake) -> dict[str, object]:
        ext = self.extractor(family)
        stats = self.real_stats(family, real, cache_key) if _NEEDS_REAL.intersection(wanted) else None
        metrics: dict[str, object] = {}
        if f"fid_{family}" in wanted:
            if n_fake < 2:
                raise ValueError(f"fid_{family}: needs at least 2 fake samples, got {n_fake}")
            metrics[f"fid_{family}"] = make_fid(ext, stats).to(self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchmetrics: "will save all extracted features"
            if f"kid_{family}" in wanted:
                size = min(self.kid_subset_size, n_fake, stats.num_samples)
                if size < 2:
                    raise ValueError(f"kid_{family}: needs at least 2 fake and 2 real samples")
                kid = KernelInceptionDistance(
                    feature=ext.view("features"),
                    subsets=self.kid_subsets,
                    subset_size=size,
                    reset_real_features=False,
                    sync_on_compute=False,
                )
                kid.real_features = [stats.features.to(self.device)]
                metrics[f"kid_{family}"] = kid.to(self.device)
            if f"is_{family}" in wanted:
                metrics[f"is_{family}"] = InceptionScore(
                    feature=ext.view("logits"), splits=min(self.is_splits, n_fake), sync_on_compute=False
                ).to(self.device)
        histogram = (
            torch.zeros(ext.output_dims["logits"], dtype=torch.long) if "class_histogram" in wanted else None
        )
        for xb in iter_batches(fake, self.batch_size, self.device):
            for name, metric in metrics.items():
                if name.startswith("is_"):
                    metric.update(xb)
                else:
                    metric.update(xb, real=False)
            if histogram is not None:
                histogram += class_histogram(ext.outputs(xb)["logits"], histogram.numel())
        ext.forget()
        out: dict[str, object] = {}
        with (
            torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", UserWarning)  # std() of a single IS split / KID subset
            torch.manual_seed(self.seed)
            for name, metric in metrics.items():
                value = metric.compute()
                if isinstance(value, tuple):  # KID and IS: (mean, std over subsets / splits; 0 for one)
                    std = float(value[1])
                    out[name], out[f"{name}_std"] = float(value[0]), std if math.isfinite(std) else 0.0
                else:
                    out[name] = float(value)
        if histogram is not None:
            p = histogram.double() / max(1, n_fake)
            entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
            out["class_histogram"] = histogram
            out["class_entropy"] = entropy / math.log(histogram.numel()) if histogram.numel() > 1 else 0.0
            out.update(uniformity(histogram))
        return out


def uniformity(histogram: Tensor) -> dict[str, float]:
    """How far class counts n_k (K classes, n in all) are from uniform.

    ``class_max_deviation`` = max_k |n_k K / n - 1|, the largest relative miss of the uniform share;
    ``class_chi2_p`` = P(chi^2_{K-1} >= sum_k (n_k - n/K)^2 / (n/K)), Pearson's test: small values mean
    the counts are unlikely from a uniform generator (for n = 1000 and K = 10 a uniform generator keeps
    every class within +-15% only about a third of the time, so read the deviation together with n).
    """
    counts = histogram.double()
    n, k = counts.sum().item(), counts.numel()
    if n == 0 or k < 2:
        return {"class_max_deviation": 0.0, "class_chi2_p": 1.0}
    expected = n / k
    chi2 = ((counts - expected) ** 2 / expected).sum()
    p = torch.special.gammaincc(torch.tensor((k - 1) / 2.0, dtype=torch.float64), chi2 / 2.0).item()
    return {"class_max_deviation": ((counts / expected) - 1.0).abs().max().item(), "class_chi2_p": p}


def compute_metrics(
    names: Sequence[str],
    fake: Tensor,
    real: RealImages = None,
    *,
    cache_key: str | None = None,
    **suite_kwargs,
) -> dict[str, object]:
    """One-shot evaluation: ``MetricSuite(names, **suite_kwargs).compute(fake, real, cache_key)``.

    Example::

        compute_metrics(["fid_classifier", "class_histogram"], fake_u8, real_u8, classifier="mnist.pt")
        compute_metrics(["fid_inception"], fake_u8, real_u8, inception_weights="/weights/inception.pth",
                        cache_dir=".cache/metrics", cache_key="cifar10-test-32-n10000")
    """
    return MetricSuite(names, **suite_kwargs).compute(fake, real, cache_key)


def scalar_logs(results: Mapping[str, object], prefix: str = "") -> dict[str, float]:
    """Flatten a result dict into floats for a logger: the histogram becomes ``class_frac/<k>`` fractions."""
    logs: dict[str, float] = {}
    for key, value in results.items():
        if key == "class_histogram":
            total = max(1, int(value.sum()))
            logs.update({f"{prefix}class_frac/{k}": int(c) / total for k, c in enumerate(value.tolist())})
        else:
            logs[f"{prefix}{key}"] = float(value)
    return logs
