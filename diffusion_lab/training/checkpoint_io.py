"""Lightning's checkpoint IO made safe: atomic writes that follow the umask, loads that never run code."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.training.checkpoint import safe_torch_load
from diffusion_lab.utils.fileio import atomic_write

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through :func:`~diffusion_lab.utils.fileio.atomic_write` (temp file, fsync, replace)."""
    atomic_write(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO: :func:`atomic_torch_save` for local paths, and every load (resume with
    ``ckpt_path=``) with ``weights_only=True``, so a checkpoint holding other objects is refused unread."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):  # remote file systems: leave it to fsspec
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        keep_device = lambda storage, loc: storage  # noqa: E731  (Lightning's default)
        return safe_torch_load(path, map_location=keep_device if map_location is None else map_location)
