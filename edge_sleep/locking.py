"""One writer per replay store: an exclusive lock on a file beside the database.

SQLite serializes transactions, but the store also keeps an in-memory mirror of its slots; two
processes appending to one file would each pick slots from a stale mirror and overwrite each
other's records. :class:`WriterLock` makes that an error instead: the first process to open a
store holds ``<store>-lock`` with ``flock`` (``LOCK_EX | LOCK_NB``), and any other process that
opens it gets :class:`~edge_sleep.errors.StoreBusyError` at once. The kernel drops the lock when
the holder closes the store or dies, even by ``kill -9``, so a crash never leaves a store locked.
Where ``fcntl`` does not exist (Windows) the lock is not taken and a ``RuntimeWarning`` says so.

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
    """An exclusive, non-blocking ``flock`` on ``<path>-lock``; :meth:`release` (or exit) frees it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(f"{path}-lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreBusyError` (never waits)."""
        if self._fd is not None:
            return
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn(f"no flock on this platform: {str(self.path)!r} is not locked against a second "
                          "process", RuntimeWarning, stacklevel=3)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StoreBusyError(
                f"the replay store {str(self.path)[:-5]!r} is open for writing elsewhere (another "
                f"process, or another ReplayStore in this one holds {str(self.path)!r}). One writer "
                "per store: two would overwrite each other's records. Fix: close the other store "
                "first, or give each process its own store path."
            ) from e
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
