"""One writer per replay store: exclusive locks on the database file and on a file beside it.

SQLite serializes transactions, but the store also keeps an in-memory mirror of its slots; two
processes appending to one file would each pick slots from a stale mirror and overwrite each
other's records. :class:`WriterLock` makes that an error instead: the first process to open a
store holds ``flock`` (``LOCK_EX | LOCK_NB``) on ``<store>-lock`` beside the resolved path and on
the database file itself, and any other process that opens it gets
:class:`~edge_sleep.errors.StoreBusyError` at once. The lock on the database file is what catches
an alias: a symbolic link resolves to the same ``-lock`` file, and a hard link (another name for
the same inode) shares the database file's lock. On Linux and Android ``flock`` locks are
independent of the POSIX record locks SQLite takes on the same file. The kernel drops the locks
when the holder closes the store or dies, even by ``kill -9``, so a crash never leaves a store
locked. Where ``fcntl`` does not exist (Windows) no lock is taken and a ``RuntimeWarning`` says so.

Example:
    >>> import tempfile, os
    >>> from edge_sleep.errors import StoreBusyError
    >>> path = os.path.join(tempfile.mkdtemp(), "r.db")
    >>> first = WriterLock(path)
    >>> first.acquire()
    >>> second = WriterLock(path)
    >>> try:
    ...     second.acquire()  # flock locks are per open file: a second open in one process is refused too
    ... except StoreBusyError:
    ...     print("busy")
    busy
    >>> first.release(); second.acquire(); second.release()
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from edge_sleep.errors import StoreBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["WriterLock"]


class WriterLock:
    """Exclusive, non-blocking ``flock`` locks on ``<resolved path>-lock`` and on the database
    file (created, owner-only, if missing); :meth:`release` (or exit) frees both."""

    def __init__(self, path: str | Path) -> None:
        self.target = Path(path)
        self.path = Path(f"{Path(path).resolve()}-lock")
        self._fds: list[int] = []

    def keys(self) -> list[str]:
        """Names of the locked file that aliases share: its resolved path, and its device and inode."""
        out = [str(self.target.resolve())]
        try:
            st = os.stat(self.target)
            out.append(f"inode:{st.st_dev}:{st.st_ino}")
        except OSError:
            pass
        return out

    def acquire(self) -> None:
        """Take both locks or raise :class:`StoreBusyError` (never waits)."""
        if self._fds:
            return
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn(f"no flock on this platform: {str(self.path)!r} is not locked against a second "
                          "process", RuntimeWarning, stacklevel=3)
            return
        try:
            for name, flags in ((self.path, os.O_RDWR | os.O_CREAT), (self.target, os.O_RDONLY | os.O_CREAT)):
                fd = os.open(name, flags, 0o600)
                self._fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.release()
            raise StoreBusyError(
                f"the replay store {str(self.target)!r} is open for writing elsewhere (another process, "
                "or another ReplayStore in this one, holds it, possibly through another path to the same "
                "file: a symbolic or hard link). One writer per store: two would overwrite each other's "
                "records. Fix: close the other store first, or give each process its own store path."
            ) from e
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # closing a descriptor drops its flock

    @property
    def held(self) -> bool:
        return bool(self._fds)
