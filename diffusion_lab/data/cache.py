"""On-disk cache of decoded datasets: one ``.pt`` file per (dataset, split, size, channels, source files).

Decoding (IDX, CDB run lengths, image folders) happens once; later runs load a uint8 tensor in well under a
second. The file name carries a hash of everything that determines the content, so a changed source file,
size or option gives a new entry instead of stale data.

Concurrency: writers take a per-entry file lock, re-check, then write the entry atomically
(:func:`~diffusion_lab.utils.fileio.atomic_write`).
Readers never see a partial file, so DDP ranks and multirun
jobs can share one cache directory; a temporary file left by a killed writer is removed by the next writer.

Integrity: each entry stores a CRC-32 of its images and labels, checked on every load; an entry that fails
it (flipped bits, an edited file) is rebuilt with a one-line warning instead of being trusted.

A full disk (or an unwritable cache folder) never stops a run: one warning, and the data stays in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from diffusion_lab.utils.fileio import atomic_write, remove_stale_temp_files

log = logging.getLogger(__name__)

__all__ = [
    "default_cache_dir",
    "fingerprint_files",
    "cache_key",
    "load_or_build",
    "load_entry",
    "checksum",
    "CACHE_VERSION",
]

# Bump when the decoded content of any dataset changes for the same inputs (2: entries carry a checksum).
CACHE_VERSION = 2

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
    """Load a cache entry: {"images": uint8 (N, C, H, W), "labels": int64 (N,), "meta": dict, "checksum"}."""
    return torch.load(path, map_location="cpu", weights_only=True)


def checksum(images: torch.Tensor, labels: torch.Tensor) -> int:
    """CRC-32 of the images' and labels' bytes (about 1 GB/s; it guards against corruption, not attack)."""
    crc = zlib.crc32(images.contiguous().numpy())
    return zlib.crc32(labels.contiguous().numpy(), crc)


_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning(message)


def _try_load(path: Path, warn: bool = True) -> dict[str, Any] | None:
    """The entry at ``path``; None when absent, unreadable (e.g. written by an incompatible version) or
    failing its checksum (warned once per entry): such an entry is rebuilt, never trusted."""
    if not path.is_file():
        return None
    try:
        entry = load_entry(path)
        ok = isinstance(entry, dict) and entry.get("checksum") == checksum(entry["images"], entry["labels"])
    except Exception:
        return None
    if not ok:
        if warn:
            log.warning("data cache entry %s failed its checksum (corrupt); rebuilding it", path)
        return None
    return entry


def load_or_build(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the entry at ``path``, building and writing it first when absent or corrupt.

    ``build()`` returns {"images", "labels", "meta"}; it runs at most once per entry across processes that
    share the cache directory (the others wait on the lock, then load). When the entry cannot be written
    (full disk, file-size limit, read-only folder) it warns once and returns the built entry from memory.
    """
    entry = _try_load(path)
    if entry is not None:
        return entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        _warn_once("unwritable", f"data cache {path.parent} is not writable ({e}); decoding into memory")
        return _build(build)
    try:
        entry = _try_load(path, warn=False)
        if entry is not None:
            return entry
        remove_stale_temp_files(path.parent, path.name)  # we hold the entry's lock: no one else writes it
        entry = _build(build)
        try:
            atomic_write(path, lambda f: torch.save(entry, f))
        except OSError as e:
            _warn_once("full", f"data cache not written: {e}; training goes on with the data in memory")
        return entry
    finally:
        lock.release()


def _build(build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    entry = build()
    return {**entry, "checksum": checksum(entry["images"], entry["labels"])}
