"""Sample-quality metrics: FID / KID / IS on Inception or digit-classifier features, class histograms.

Entry points:
    compute_metrics(names, fake_u8, real_u8, classifier=..., cache_dir=..., cache_key=...) -> dict
    MetricSuite(names, ...).compute(fake_u8, real, cache_key)     (reuses extractors and real statistics)
    train_classifier(train_x, train_y, test_x, test_y, epochs, seed) -> (DigitClassifier, accuracy)
        (import it from ``diffusion_lab.metrics.train_classifier``, which also runs as a command)
    save_classifier / load_classifier

Modules: ``features`` (extractor plumbing for torchmetrics), ``fid`` (Inception features, FID, real-statistics
cache), ``classifier`` (the CNN and its features), ``train_classifier`` (training + CLI), ``suite`` (facade).
"""

from diffusion_lab.metrics.classifier import (
    ClassifierConfig,
    ClassifierFeatures,
    DigitClassifier,
    class_histogram,
    load_classifier,
    save_classifier,
)
from diffusion_lab.metrics.fid import InceptionFeatures, RealStats, RealStatsCache, make_fid, real_statistics
from diffusion_lab.metrics.suite import (
    DISPLAY_NAMES,
    METRIC_NAMES,
    MetricSuite,
    compute_metrics,
    scalar_logs,
    uniformity,
)

__all__ = [
    "ClassifierConfig",
    "ClassifierFeatures",
    "DigitClassifier",
    "class_histogram",
    "load_classifier",
    "save_classifier",
    "InceptionFeatures",
    "RealStats",
    "RealStatsCache",
    "make_fid",
    "real_statistics",
    "DISPLAY_NAMES",
    "METRIC_NAMES",
    "MetricSuite",
    "compute_metrics",
    "uniformity",
    "scalar_logs",
]
