"""The private attributes of dependencies that the code relies on still exist on the installed versions.

Each entry is one private name, where the code uses it and why no public API does the job. An upgrade that
renames or removes one fails here with its name and the user of it, instead of deep inside a run (or, for an
overridden method, not at all: the override would silently stop being called). The dependencies' ranges in
pyproject.toml cap the major versions; this test is what catches a minor release.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, NamedTuple

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, WeightAveraging
from torchmetrics.image.fid import NoTrainInceptionV3


def _logger_connector():
    from lightning.pytorch import Trainer

    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)._logger_connector


class Private(NamedTuple):
    dist: str  # the distribution that owns it
    owner: Callable[[], Any]  # gives what carries it (a class given as such gives an instance)
    name: str
    params: tuple[str, ...]  # the parameters the code passes, for methods
    used_by: str


PRIVATES = [
    Private(
        "lightning",
        ModelCheckpoint,
        "_last_global_step_saved",
        (),
        "training/callbacks.py FinalLastCheckpoint: marks its own save of last.ckpt as the latest, so "
        "ModelCheckpoint does not save the same step again (no public setter)",
    ),
    Private(
        "lightning",
        ModelCheckpoint,
        "_last_checkpoint_saved",
        (),
        "training/callbacks.py FinalLastCheckpoint: the same, for the path",
    ),
    Private(
        "lightning",
        WeightAveraging,
        "_average_model",
        (),
        "training/callbacks.py EMA.averaged: the averaged copy of the module (WeightAveraging exposes none)",
    ),
    Private(
        "lightning",
        lambda: RichProgressBar,
        "_initialize_train_progress_bar_id",
        (),
        "training/progress_bar.py StepProgressBar overrides it: Lightning calls it when a resumed run "
        "starts mid-epoch",
    ),
    Private(
        "lightning",
        lambda: RichProgressBar,
        "_update",
        ("progress_bar_id", "current"),
        "training/progress_bar.py StepProgressBar: moves its one bar to the global step",
    ),
    Private(
        "lightning",
        lambda: RichProgressBar,
        "_update_metrics",
        ("trainer", "pl_module"),
        "training/progress_bar.py StepProgressBar: the metrics beside the bar",
    ),
    Private(
        "torchmetrics",
        lambda: NoTrainInceptionV3,
        "_torch_fidelity_forward",
        ("x",),
        "metrics/fid.py InceptionFeatures: pool3 features and logits in one pass (forward returns only the "
        "first of its features_list)",
    ),
    Private(
        "torch",
        lambda: torch,
        "_foreach_lerp_",
        (),
        "training/callbacks.py, training/phema.py: EMA updates in one fused pass",
    ),
    Private("torch", lambda: torch, "_foreach_norm", (), "training/guards.py: gradient norms in one pass"),
    Private(
        "torch",
        lambda: torch,
        "_foreach_copy_",
        (),
        "training/callbacks.py EMA: copies the buffers into the averaged model in one pass",
    ),
    Private(
        "torch",
        lambda: torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True),
        "_step_supports_amp_scaling",
        (),
        "training/guards.py: a fused optimizer step reads found_inf on the device and skips itself (the "
        "guard's no-wait skip; GradScaler relies on the same flag)",
    ),
    Private(
        "lightning",
        lambda: WeightAveraging(),
        "_latest_update_step",
        (),
        "training/callbacks.py EMA: the step of the last update, kept in Python (no read of n_averaged)",
    ),
    Private(
        "lightning",
        lambda: WeightAveraging(),
        "_use_buffers",
        (),
        "training/callbacks.py EMA: whether buffers are averaged or copied",
    ),
    Private(
        "lightning",
        _logger_connector,
        "log_metrics",
        ("metrics",),
        "training/throughput.py ImagesPerSecond: logs the images/s at logging steps (as ThroughputMonitor "
        "does; LightningModule.log is not callable from that hook)",
    ),
    Private(
        "lightning",
        _logger_connector,
        "should_update_logs",
        (),
        "training/host_sync.py: which steps are logging steps (the test checks it against Lightning's rule)",
    ),
    Private(
        "torch",
        lambda: torch.zeros(1),
        "_version",
        (),
        "metrics/features.py: a tensor changed in place is not served from the feature cache",
    ),
]


@pytest.mark.parametrize("p", PRIVATES, ids=[f"{p.dist}:{p.name}" for p in PRIVATES])
def test_private_attribute_still_exists(p: Private):
    owner = p.owner()
    where = f"{p.dist} {version(p.dist)}: {getattr(owner, '__name__', type(owner).__name__)}.{p.name}"
    advice = (
        f"diffusion_lab relies on it in {p.used_by}; adapt that code, or cap {p.dist} below "
        f"{version(p.dist)} in pyproject.toml"
    )
    assert hasattr(owner, p.name), f"{where} is gone. {advice}"
    if p.params:
        have = inspect.signature(getattr(owner, p.name)).parameters
        missing = [q for q in p.params if q not in have]
        assert not missing, f"{where} no longer takes {', '.join(missing)}. {advice}"
