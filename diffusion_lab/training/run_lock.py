"""One run per run directory: a lock file holding the PID and host of the run that owns the folder.

The lock is a :class:`filelock.FileLock` on ``<run dir>/.run.lock`` (an ``flock`` on POSIX, ``msvcrt``
locking on Windows), which the operating system releases when its process ends however it ends (kill -9
included); ``<run dir>/run.lock`` names its holder (PID, host, start time). A ``run.lock`` left by a dead run
is therefore stale: the next run takes it over (and says so). A second run while the first is alive is
refused with one line naming the PID and host, before it writes anything into the folder. The holder's line
lives in its own file because filelock may truncate the file it locks when it opens it.

The lock is taken where Hydra makes the folder (:class:`RunDirLockCallback`, before Hydra writes
``.hydra/``) and again by ``train()`` for callers that bypass Hydra; a process holding the lock takes it
again freely. Only the launching process locks: DDP ranks other than 0 (``RANK`` / ``LOCAL_RANK`` /
``NODE_RANK`` / ``SLURM_PROCID`` set and not 0) share their rank 0's folder and lock.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion_lab.utils.cli import CommandError, exit_on_bad_input

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "GUARD_NAME",
    "RunDirLocked",
    "lock_run_dir",
    "release_run_dir",
    "run_dir_in_use",
    "RunDirLockCallback",
]

LOCK_NAME = "run.lock"  # the holder: "PID 123 on host (since 2026-01-01 12:00:00)"; removed at release
GUARD_NAME = ".run.lock"  # the file filelock locks
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_held: dict[Path, FileLock] = {}  # run dir -> its lock, for the locks this process holds


class RunDirLocked(CommandError):
    """Another live run holds the run directory."""


def is_launching_process() -> bool:
    """Whether this process is rank 0 of its run (or not distributed at all)."""
    return all(os.environ.get(v, "0") in ("", "0") for v in _RANK_VARS)


def _read_holder(path: Path) -> str:
    try:
        return path.read_bytes()[:4096].decode(errors="replace").strip()
    except OSError:
        return ""


def _write_holder(path: Path) -> None:
    me = f"PID {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, me.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _guard(run_dir: Path) -> FileLock:
    # one lock per process, not per thread: the thread that releases it may not be the one that took it
    return FileLock(run_dir / GUARD_NAME, timeout=0, thread_local=False)


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take the lock of ``run_dir`` (created if missing) for this process; no-op on ranks other than 0.

    Returns:
        True when this call took it (False: already held by this process, not rank 0, or a file system
        without locks, which is said in a warning).
    Raises:
        RunDirLocked: a live run holds it.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or not is_launching_process():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    holder_file = run_dir / LOCK_NAME
    lock = _guard(run_dir)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(holder_file) or "another process"
        raise RunDirLocked(
            f"run directory {run_dir} is in use by {holder}; wait for that run to finish, or start this "
            "one in another folder (leave hydra.run.dir at its default)"
        ) from None
    except (OSError, NotImplementedError) as e:  # a file system without locks: run unlocked, not at all
        log.warning("run directory %s cannot be locked (%s); not guarding against a second run", run_dir, e)
        return False
    stale = _read_holder(holder_file)
    if stale:
        log.warning("run directory %s: taking over the stale lock of %s (no longer running)", run_dir, stale)
    _write_holder(holder_file)
    _held[run_dir] = lock
    return True


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Remove the lock file of ``run_dir`` and release the lock, if this process holds it."""
    run_dir = Path(run_dir).resolve()
    lock = _held.pop(run_dir, None)
    if lock is None:
        return
    try:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    finally:
        lock.release(force=True)


def run_dir_in_use(run_dir: str | os.PathLike) -> bool:
    """Whether a live process (this one included) holds the lock of ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return True
    if not (run_dir / GUARD_NAME).is_file():
        return False
    lock = _guard(run_dir)
    try:
        lock.acquire()
    except Timeout:
        return True
    except (OSError, NotImplementedError):
        return False
    lock.release(force=True)
    return False


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
