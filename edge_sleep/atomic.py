"""Atomic folder writes: build a folder beside its target, then swap it in with two renames.

A reader sees the old folder or the new one, never a half-written one. Every file and the folder
are fsynced before the swap and the parent after it, so a power cut cannot leave a renamed folder
with empty files. A crash between the two renames leaves the previous folder at ``.<name>.old``;
the next write (and :meth:`edge_sleep.EdgeSleep.load`) finds it there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "previous_of", "fsync_tree"]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder``, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def previous_of(target: Path) -> Path:
    """Where the previous folder waits during the swap: ``.<name>.old`` beside ``target``."""
    return target.with_name(f".{target.name}.old")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces ``target``, on an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = previous_of(target)
        if not target.exists() and old.exists():  # an earlier write crashed between its renames
            os.replace(old, target)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
