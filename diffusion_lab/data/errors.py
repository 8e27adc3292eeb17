"""Errors raised on bad data: each carries one line naming the problem and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["MissingDataError", "CorruptDataError", "missing_files_error"]


class MissingDataError(FileNotFoundError):
    """The dataset's files are not on disk (and were not downloaded)."""


class CorruptDataError(ValueError):
    """A data file is malformed: wrong magic, truncated, inconsistent counts, undecodable image, ..."""


def missing_files_error(
    name: str, root: Path | str | None, files: Sequence[str], downloadable: bool = True, hint: str = ""
) -> MissingDataError:
    """Build the one-line error for missing files: which dataset, which files, where we looked, how to fix.

    Args:
        name: dataset name as typed on the command line (``dataset=<name>``).
        root: the folder that was searched.
        files: the missing file names (relative to ``root``).
        downloadable: whether ``dataset.download=true`` can fetch them.
        hint: an extra remedy appended to the message (e.g. an offline alternative).
    """
    listed = ", ".join(f"'{f}'" for f in files)
    fix = "point dataset.root= at a folder holding them"
    if downloadable:
        fix = f"set dataset.download=true to fetch them (needs internet) or {fix}"
    msg = f"dataset '{name}': missing {listed} in {root}; {fix}"
    if hint:
        msg += f" ({hint})"
    return MissingDataError(msg)
