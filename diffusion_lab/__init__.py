"""diffusion_lab: denoising diffusion models on PyTorch Lightning and Hydra.

The Python API (:mod:`diffusion_lab.api`), loaded on first use:

    pipe = diffusion_lab.load("outputs/train/runs/<run>/checkpoints/last.ckpt")   # or an exported folder
    images = pipe.sample(16, seed=0).images                                        # (16, C, H, W) in [-1, 1]
    run_dir = diffusion_lab.train(["dataset=digits", "trainer.max_steps=500"])

Importing the package changes nothing in the host program: no environment variables, no thread settings,
no config resolvers (the commands and the API's ``configure_threads=True`` set them:
:mod:`diffusion_lab.utils.cpu`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusion_lab.api import Pipeline, load

__all__ = ["load", "train", "Pipeline"]


def __getattr__(name: str) -> Any:
    if name in ("load", "Pipeline"):
        return getattr(importlib.import_module("diffusion_lab.api"), name)
    if name == "train":
        # the training module (``python -m diffusion_lab.train``), callable as diffusion_lab.api.train: the
        # package attribute of a submodule is the submodule, so the two share the name
        return importlib.import_module("diffusion_lab.train")
    raise AttributeError(f"module 'diffusion_lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
