"""Atomic folder writes: build a folder beside its target, then swap it in with two renames.

A reader sees the old folder or the new one, never a half-written one. Every file and the folder
are fsynced before the swap and the parent after it, so a power cut cannot leave a renamed folder
with empty files. A crash between the two renames leaves the previous folder at ``.<name>.old``;
the next write (and :meth:`edge_sleep.EdgeSleep.load`) finds it there.

The new folder is built in ``.<name>.tmp-<pid>-<random>``; a write killed before its swap leaves
that folder behind, and the next write to the same target removes every such folder whose
process is gone (never one of a live process, nor one of its own). Writers of one target, threads
or processes, take turns for the swap: each holds an exclusive ``flock`` on ``.<name>.lock``
beside the target for its renames (not while it builds its folder), so concurrent writes all
complete and the last one wins. A target that exists and is not a folder is refused before
anything is written.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_sleep.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_directory", "previous_of", "fsync_tree", "lock_of", "temp_folders_of"]

_FALLBACK_LOCK = threading.Lock()  # where flock does not exist: one swap at a time in this process


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


def lock_of(target: Path) -> Path:
    """The file whose ``flock`` serializes the swaps into ``target``: ``.<name>.lock`` beside it."""
    return target.with_name(f".{target.name}.lock")


def _temp_pattern(target: Path) -> re.Pattern[str]:
    # mkdtemp's random part is 8 of [a-z0-9_]: no dot, so another target's folders never match
    return re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[a-z0-9_]+")


def temp_folders_of(target: Path) -> dict[Path, int]:
    """The temporary folders of writes to ``target`` beside it, each with the id of the process that made it."""
    pattern = _temp_pattern(Path(target))
    try:
        names = os.listdir(Path(target).parent)
    except OSError:
        return {}
    found: dict[Path, int] = {}
    for name in names:
        m = pattern.fullmatch(name)
        if m is not None:
            found[Path(target).with_name(name)] = int(m.group(1))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists; ``True`` whenever that cannot be told for sure."""
    if pid <= 0 or sys.platform == "win32":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # PermissionError: it exists, another user's
        return True
    try:  # a zombie (killed, not yet reaped by its parent) writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS), or the process just ended
        return True


def _remove(path: Path) -> None:
    """Remove a folder tree, a file or a link at ``path``; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _remove_stale_temps(target: Path) -> None:
    """Remove the temporary folders of writes to ``target`` whose process has died (a crash, kill -9)."""
    own = os.getpid()
    for folder, pid in temp_folders_of(target).items():
        if pid != own and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _swap_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on :func:`lock_of` ``(target)``; threads and processes alike wait their turn.

    The holder removes the lock file before it lets go, so none is left beside the target; a
    waiter that then gets the lock of a removed file sees the name gone (or another inode
    behind it) and locks the current file instead.
    """
    if fcntl is None:  # pragma: no cover - Windows
        with _FALLBACK_LOCK:
            yield
        return
    path = lock_of(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
                current = (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _check_target(target: Path) -> None:
    """Refuse a ``target`` that exists and is not a folder (a swap would move it aside and lose it).

    Raises:
        CheckpointError: ``target`` is a file, a link to one or a dangling link.
    """
    try:
        is_folder = stat.S_ISDIR(os.stat(target).st_mode)  # one look: another writer may be mid-swap
    except FileNotFoundError:
        is_folder = not os.path.islink(target)  # nothing there is fine; a dangling link is not
    except NotADirectoryError:  # a file where a parent folder goes: atomic_directory reports it
        is_folder = True
    if not is_folder:
        kind = "a link" if os.path.islink(target) else "a file"
        raise CheckpointError(
            f"{str(target)!r} is {kind}, not a folder; expected a folder (or nothing) at that path to write "
            "into. Fix: remove or rename that file, or write to another path.")


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces ``target``, on an error it is removed.

    Everything is checked and the temporary folder made before the body runs, so a bad target
    fails before any expensive work inside the ``with``.

    Raises:
        CheckpointError: ``target`` exists and is not a folder, or its parent cannot be created
            or written (checked before anything is written).
    """
    target = Path(target)
    _check_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise CheckpointError(
            f"cannot write the folder {str(target)!r}: {e.strerror or e} ({type(e).__name__} in "
            f"{str(target.parent)!r}); expected a writable folder to put it in. Fix: check that "
            f"{str(target.parent)!r} is (or can be created as) a writable folder on a disk with free space, "
            "or write to another path.") from e
    try:
        yield tmp
        fsync_tree(tmp)
        with _swap_lock(target):
            old = previous_of(target)
            if not target.exists() and old.is_dir() and not old.is_symlink():
                os.replace(old, target)  # an earlier write crashed between its renames
            _remove(old)
            if target.exists() or target.is_symlink():
                os.replace(target, old)
            os.replace(tmp, target)
            _fsync_path(target.parent)
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
