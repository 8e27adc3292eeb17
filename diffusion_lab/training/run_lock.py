"""One run per run directory: a lock file holding the PID and host of the run that owns the folder.

The lock is an ``flock`` on ``<run dir>/run.lock``, which the kernel releases when its process ends however
it ends (kill -9 included). A lock file left by a dead run is therefore stale: the next run takes it over
(and says so). A second run while the first is alive is refused with one line naming the PID and host,
before it writes anything into the folder.

The lock is taken where Hydra makes the folder (:class:`RunDirLockCallback`, before Hydra writes
``.hydra/``) and again by ``train()`` for callers that bypass Hydra; a process holding the lock takes it
again freely. Only the launching process locks: DDP ranks other than 0 (``RANK`` / ``LOCAL_RANK`` /
``NODE_RANK`` / ``SLURM_PROCID`` set and not 0) share their rank 0's folder and lock.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion_lab.utils.cli import CommandError, exit_on_bad_input

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "RunDirLocked",
    "lock_run_dir",
    "release_run_dir",
    "run_dir_in_use",
    "RunDirLockCallback",
]

LOCK_NAME = "run.lock"
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_held: dict[Path, int] = {}  # run dir -> fd of its lock file, for the locks this process holds


class RunDirLocked(CommandError):
    """Another live run holds the run directory."""


def is_launching_process() -> bool:
    """Whether this process is rank 0 of its run (or not distributed at all)."""
    return all(os.environ.get(v, "0") in ("", "0") for v in _RANK_VARS)


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take the lock of ``run_dir`` (created if missing) for this process; no-op on ranks other than 0.

    Returns:
        True when this call took it (False: already held by this process, or not rank 0).
    Raises:
        RunDirLocked: a live run holds it.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or fcntl is None or not is_launching_process():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = _try_flock(fd)
        except OSError as e:  # a file system without locks: run unlocked rather than not at all
            os.close(fd)
            log.warning(
                "run directory %s cannot be locked (%s); not guarding against a second run", run_dir, e
            )
            return False
        if not locked:
            holder = _read_holder(fd) or "another process"
            os.close(fd)
            raise RunDirLocked(
                f"run directory {run_dir} is in use by {holder}; wait for that run to finish, or start this "
                "one in another folder (leave hydra.run.dir at its default)"
            )
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    stale = _read_holder(fd)
    if stale:
        log.warning("run directory %s: taking over the stale lock of %s (no longer running)", run_dir, stale)
    me = f"PID {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    os.fsync(fd)
    _held[run_dir] = fd
    return True


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Remove the lock file of ``run_dir`` and release it, if this process holds it."""
    run_dir = Path(run_dir).resolve()
    fd = _held.pop(run_dir, None)
    if fd is None:
        return
    try:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    finally:
        os.close(fd)  # closing releases the flock


def run_dir_in_use(run_dir: str | os.PathLike) -> bool:
    """Whether a live process (this one included) holds the lock of ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return True
    path = run_dir / LOCK_NAME
    if fcntl is None or not path.is_file():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _try_flock(fd)
    except OSError:
        return False
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for run_dir in list(_held):
        release_run_dir(run_dir)


class RunDirLockCallback(Callback):
    """Hydra callback: lock the run (or sweep) directory before Hydra writes into it; unlock at the end."""

    def _lock(self, folder: Any) -> None:
        with exit_on_bad_input():
            lock_run_dir(os.path.abspath(str(folder)))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(config.hydra.run.dir)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_run_dir(os.path.abspath(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_run_dir(os.path.abspath(str(config.hydra.sweep.dir)))
