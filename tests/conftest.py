"""Shared fixtures: the real datasets beside the project, and small-thread settings for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffusion_lab.utils.cpu import register_resolvers

REPO = Path(__file__).resolve().parents[1]
# One thread: the tests run many small ops, which a second thread slows down on a busy 2-core machine;
# the training processes the tests start inherit it through DIFFUSION_LAB_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("DIFFUSION_LAB_THREADS", "1")
# The tests compose conf/ themselves, as the commands do: the configs' resolvers (${cpu_precision:}), which
# importing the package no longer registers (no side effects on import).
register_resolvers()


def shared_data_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_LAB_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (../shared/data). Skips where absent, but fails under CI, which must have them."""
    root = shared_data_dir()
    if not (root / "mnist").is_dir() or not (root / "hoda").is_dir():
        msg = f"real datasets not found at {root} (set DIFFUSION_LAB_SHARED_DATA)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must have them")
        pytest.skip(msg)
    return root
