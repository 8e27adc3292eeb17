"""Verified downloads: try each mirror, check size / md5 / content, and keep only a complete file.

A download streams into a hidden temporary file beside the destination, is verified there, and is moved into
place with ``os.replace`` (:func:`~diffusion_lab.utils.fileio.atomic_write`). A failed or corrupt download is
deleted, so a later run never mistakes a partial file for data. A failure is a :class:`DownloadError`, one
line that the commands print without a traceback.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from diffusion_lab.utils.cli import CommandError
from diffusion_lab.utils.fileio import DiskFullError, atomic_write

__all__ = ["download_file", "file_md5", "join_url", "DownloadError"]


class DownloadError(CommandError, RuntimeError):
    """No mirror gave a verified file."""


_CHUNK = 1 << 20


def file_md5(path: Path | str, chunk_size: int = _CHUNK) -> str:
    """md5 hex digest of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def join_url(base: str, filename: str) -> str:
    """``base`` (a folder URL) joined with a file name, percent-encoding spaces and the like."""
    return base.rstrip("/") + "/" + urllib.parse.quote(filename)


def download_file(
    urls: Sequence[str],
    dest: Path | str,
    md5: str | None = None,
    size: int | None = None,
    validate: Callable[[Path], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``dest`` from the first URL that yields a verified file.

    Args:
        urls: candidate URLs of the same file, tried in order (mirrors).
        dest: final path; written only once the file passed every check.
        md5: expected md5 hex digest, or None when not published.
        size: expected size in bytes, or None when not published.
        validate: optional content check ``validate(tmp_path)`` raising on a bad file (e.g. record count).
        timeout: socket timeout in seconds per request.

    Returns:
        ``dest``.

    Raises:
        DownloadError: no URL gave a verified file; names every URL with its reason and states that no
            partial file was kept (a RuntimeError, so callers adding context catch it as one).
        DiskFullError: the destination's disk is full (no other mirror would help).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons = []

    def fetch(url: str):
        def write(out) -> None:
            h = hashlib.md5(usedforsecurity=False)
            n = 0
            request = urllib.request.Request(url, headers={"User-Agent": "diffusion_lab"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
            out.flush()
            if size is not None and n != size:
                raise ValueError(f"size {n} bytes, expected {size}")
            if md5 is not None and h.hexdigest() != md5:
                raise ValueError(f"md5 {h.hexdigest()}, expected {md5} (checksum mismatch)")
            if validate is not None:
                validate(Path(out.name))

        return write

    for url in urls:
        try:
            return atomic_write(dest, fetch(url), measure=False)
        except DiskFullError:
            raise
        except (OSError, ValueError, urllib.error.URLError) as e:
            reasons.append(f"{url}: {e}")
    raise DownloadError(
        f"download of '{dest.name}' failed ({'; '.join(reasons)}); no partial file was kept in "
        f"{dest.parent}; check the connection, or place the file there yourself"
    )
