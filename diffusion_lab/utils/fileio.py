"""Atomic file writes: a file is either the old one or the complete new one, never half.

Every file this project writes for later runs (checkpoints, cache entries, downloads, real-data statistics,
classifiers) goes through :func:`atomic_write`: write a hidden temporary file beside the destination, fsync,
``os.replace`` it onto the destination. The temporary file is created like ``open(path, "wb")`` creates a
file, so the result follows the umask (a shared cluster folder stays shared). On any failure the temporary
file is removed and the previous file is untouched; a full disk or a file-size limit becomes one
:class:`DiskFullError` line naming the cause, the path and the bytes needed.
"""

from __future__ import annotations

import errno
import os
import resource
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from diffusion_lab.utils.cli import CommandError

__all__ = ["atomic_write", "DiskFullError", "remove_stale_temp_files", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
_FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large",
    errno.EDQUOT: "disk quota exceeded",
}


class DiskFullError(CommandError, OSError):
    """A write failed: no space left (ENOSPC), over the file-size limit (EFBIG) or over a quota (EDQUOT)."""

    def __str__(self) -> str:
        return str(self.strerror)


class _Recorder:
    """A binary file that remembers the first error of ``write`` and counts the bytes written.

    ``torch.save`` turns a failed write into ``RuntimeError: ... unexpected pos``; the recorder keeps the
    real cause.
    """

    def __init__(self, f: BinaryIO | None):
        self._f = f
        self.written = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self._f is None:  # counting only
            n = len(memoryview(data).cast("B"))
        else:
            try:
                n = self._f.write(data)
            except OSError as e:
                self.error = self.error or e
                raise
        self.written += n
        return n

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def __getattr__(self, name: str) -> Any:
        if name == "_f" or self._f is None:
            raise AttributeError(name)
        return getattr(self._f, name)


def _disk_full_cause(e: BaseException, recorder: _Recorder) -> OSError | None:
    """The ENOSPC / EFBIG / EDQUOT error behind ``e`` (itself, its cause chain, or the recorded write)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return seen
        seen = seen.__cause__ or seen.__context__
    if recorder.error is not None and recorder.error.errno in _FULL:
        return recorder.error
    return None


def _needed_bytes(write_fn: Callable[[BinaryIO], Any], measure: bool, written: int) -> str:
    if measure:
        counter = _Recorder(None)
        try:
            write_fn(counter)  # type: ignore[arg-type]
            return f"needs {counter.written:,} bytes"
        except Exception:
            pass
    return f"needs more than the {written:,} bytes written"


def _disk_full_error(cause: OSError, path: Path, needed: str) -> DiskFullError:
    what = _FULL[cause.errno]
    if cause.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        room = "over the file-size limit" + (
            f" of {limit:,} bytes (ulimit -f)" if limit != resource.RLIM_INFINITY else ""
        )
    else:
        try:
            room = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
        except OSError:
            room = "free space unknown"
    return DiskFullError(
        cause.errno,
        f"{what} writing {path}: {needed}, {room}; the previous file is kept and the partial temporary file "
        "was removed; free space there or write to another folder",
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any], measure: bool = True) -> Path:
    """Write ``path`` through ``write_fn(f)`` atomically; returns ``path``.

    Args:
        path: the destination; its folder is created when missing.
        write_fn: writes the content to ``f``, a binary file open on the temporary file (``f.name`` is its
            path, e.g. to check the written file before it is moved into place). Any exception it raises
            removes the temporary file and propagates.
        measure: on a full disk, run ``write_fn`` once more into a byte counter to report the size needed
            (False for writers that cannot run twice, e.g. a download stream).
    Raises:
        DiskFullError: no space left, file too large or quota exceeded (one line: cause, path, bytes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            f = open(tmp, "xb")  # mode 0o666 & ~umask, exactly as open() / torch.save create files
            break
        except FileExistsError:
            continue
    recorder = _Recorder(f)
    try:
        with f:
            write_fn(recorder)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _disk_full_cause(e, recorder)
        if cause is None:
            raise
        raise _disk_full_error(cause, path, _needed_bytes(write_fn, measure, recorder.written)) from None
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files that an interrupted :func:`atomic_write` left in ``folder``.

    Only call it where no other process can be writing (e.g. holding the folder's lock). ``name``: only
    the temporary files of that destination file name.
    """
    pattern = f".{name}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"
    removed = []
    for p in Path(folder).glob(pattern):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
