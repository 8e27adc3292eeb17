"""On-disk cache of decoded datasets: one ``.pt`` file per (dataset, split, size, channels, source files).

Decoding (IDX, CDB run lengths, image folders) happens once; later runs load a uint8 tensor in well under a
second. The file name carries a hash of everything that determines the content, so a changed source file,
size or option gives a new entry instead of stale data.

Concurrency: writers take a per-entry file lock, re-check, then write a temporary file and ``os.replace`` it
into place. Readers never see a partial file, so DDP ranks and multirun jobs can share one cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

__all__ = [
    "default_cache_dir",
    "fingerprint_files",
    "cache_key",
    "load_or_build",
    "load_entry",
    "CACHE_VERSION",
]

# Bump when the decoded content of any dataset changes for the same inputs.
CACHE_VERSION = 1

# Files up to this size are hashed in full (md5 of a few MB takes milliseconds); larger ones by size, mtime
# and the md5 of their first and last MiB.
_FULL_HASH_LIMIT = 32 << 20
_EDGE = 1 << 20


def default_cache_dir() -> Path:
    """``$DIFFUSION_LAB_CACHE`` or ``~/.cache/diffusion_lab``."""
    env = os.environ.get("DIFFUSION_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffusion_lab"


def _file_digest(path: Path) -> str:
    st = path.stat()
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        if st.st_size <= _FULL_HASH_LIMIT:
            while chunk := f.read(_EDGE):
                h.update(chunk)
            return f"{st.st_size}:{h.hexdigest()}"
        h.update(f.read(_EDGE))
        f.seek(-_EDGE, os.SEEK_END)
        h.update(f.read(_EDGE))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def fingerprint_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """A digest of the given files' contents (md5, or size + mtime + edge md5 for files over 32 MiB).

    Names enter relative to ``root`` (when given) so that moving a dataset folder keeps its cache.
    """
    h = hashlib.md5(usedforsecurity=False)
    for p in paths:
        name = str(p.relative_to(root)) if root is not None else p.name
        h.update(f"{name}={_file_digest(p)}\n".encode())
    return h.hexdigest()


def cache_key(fields: dict[str, Any]) -> str:
    """Short stable hash of JSON-able fields (dataset, split, size, channels, options, fingerprint)."""
    blob = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_entry(path: Path) -> dict[str, Any]:
    """Load a cache entry: {"images": uint8 (N, C, H, W), "labels": int64 (N,), "meta": dict}."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_atomic(entry: dict[str, Any], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(entry, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _try_load(path: Path) -> dict[str, Any] | None:
    """The entry at ``path``; None when absent or unreadable (e.g. written by an incompatible version)."""
    if not path.is_file():
        return None
    try:
        return load_entry(path)
    except Exception:  # an unreadable entry is rebuilt, never trusted
        return None


def load_or_build(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the entry at ``path``, building and writing it first when absent.

    ``build()`` returns {"images", "labels", "meta"}; it runs at most once per entry across processes that
    share the cache directory (the others wait on the lock, then load).
    """
    entry = _try_load(path)
    if entry is not None:
        return entry
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        entry = _try_load(path)
        if entry is not None:
            return entry
        entry = build()
        _save_atomic(entry, path)
        return entry
