"""The real images a study scores its samples against, and the metric suite that scores them, in one place.

Every study (``experiments/``) and ``evaluate`` ask the same thing of a checkpoint: "the real images of its
dataset's test split, and FID on the classifier's features plus the class histogram against all of them".
:func:`real_reference` answers it from a run config (the dataset moved with ``data_root`` if it lives
elsewhere now) and caches the real statistics under :meth:`DataModule.real_stats_key`, which includes the
data files' fingerprint::

    ref = real_reference(run_cfg, data_root="/data/hoda")
    scores = ref.score(fake_u8)       # {"fid_classifier": ..., "class_histogram": [...], "class_band": {...}}
    floor = ref.floor(1000, seed=0)   # the same metrics of 1,000 real test images: the floor at that n
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from diffusion_lab.metrics.suite import MetricSuite

__all__ = ["RealReference", "real_reference", "class_band"]

DEFAULT_METRICS = ("fid_classifier", "class_histogram")


def class_band(histogram: Sequence[int], tolerance: float = 0.15) -> dict[str, Any]:
    """Class shares of a histogram against the uniform share 1/K +- ``tolerance`` (relative): the shares, the
    classes outside the band, and the largest relative deviation."""
    counts = torch.as_tensor(list(histogram), dtype=torch.float64)
    shares = counts / counts.sum()
    uniform = 1.0 / len(counts)
    deviation = (shares - uniform).abs() / uniform
    outside = [int(k) for k in torch.nonzero(deviation > tolerance).flatten()]
    return {
        "shares": [round(float(s), 4) for s in shares],
        "outside_band": outside,
        "max_relative_deviation": float(deviation.max()),
    }


@dataclass
class RealReference:
    """Real images of one split (uint8 (N, C, H, W) and labels), the suite and the statistics' cache key."""

    images: Tensor
    labels: Tensor
    suite: MetricSuite
    key: str
    split: str = "test"
    meta: dict[str, Any] = field(default_factory=dict)
    datamodule: Any = None

    def score(self, fake: Tensor) -> dict[str, Any]:
        """The suite's metrics of uint8 samples against every real image of the split: floats, the class
        histogram as a list and, with it, :func:`class_band` of the histogram."""
        out: dict[str, Any] = {}
        for name, value in self.suite.compute(fake, real=self.images, cache_key=self.key).items():
            if isinstance(value, Tensor) and value.numel() > 1:
                out[name] = value.tolist()
            else:
                out[name] = float(value)
        if "class_histogram" in out:
            out["class_band"] = class_band(out["class_histogram"])
        return out

    def floor(self, n: int, seed: int = 0) -> dict[str, Any]:
        """The same metrics of ``n`` real images of the split drawn at random (seeded): what a perfect model
        scores with ``n`` samples (FID is biased upwards at small n)."""
        pick = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(seed))[:n]
        return self.score(self.images[pick])


def real_reference(
    run_cfg: DictConfig | Mapping,
    *,
    data_root: str | None = None,
    split: str = "test",
    names: Sequence[str] = DEFAULT_METRICS,
    classifier: str | None = None,
    device: torch.device | str = "cpu",
) -> RealReference:
    """The :class:`RealReference` of a run's dataset (``run_cfg.dataset``, with its root replaced by
    ``data_root``): every image of ``split``, a :class:`MetricSuite` of ``names`` with the run's digit
    classifier (or ``classifier``) and cache directory, and the split's :meth:`real_stats_key`."""
    cfg = run_cfg if isinstance(run_cfg, DictConfig) else OmegaConf.create(dict(run_cfg))
    dataset = OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True))
    with open_dict(dataset):
        if data_root:
            dataset.root = str(data_root)
    dm = instantiate(dataset)
    dm.prepare_data()
    images, labels = dm.real_images(split)
    metrics = cfg.get("metrics") or {}
    suite = MetricSuite(
        list(names),
        classifier=classifier or metrics.get("classifier_path"),
        cache_dir=metrics.get("cache_dir"),
        device=device,
    )
    meta = {"dataset": dm.name, "image_size": dm.image_size, "split": split, "real_images": len(images)}
    return RealReference(images, labels, suite, dm.real_stats_key(split), split, meta, dm)
