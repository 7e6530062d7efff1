"""Errors raised by edge-sleep.

Every error is an :class:`EdgeSleepError`; subclasses also subclass the fitting builtin so
``except ValueError`` keeps working. Messages name what failed, the value, what was expected and
the fix.
"""

from __future__ import annotations

__all__ = [
    "EdgeSleepError",
    "ConfigError",
    "InputError",
    "StoreError",
    "StorePathError",
    "StoreBusyError",
    "StoreKeyError",
    "FingerprintMismatchError",
    "FormatVersionError",
    "CorruptRecordError",
    "CallOrderError",
    "ExportError",
    "CheckpointError",
    "NativeKernelError",
    "check_format_version",
    "first_line",
]


class EdgeSleepError(Exception):
    """Base class of every error edge-sleep raises on purpose."""


class ConfigError(EdgeSleepError, ValueError):
    """A configuration value is out of range; every problem is listed in one message."""

    def __init__(self, owner: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{owner} has {len(self.problems)} invalid value(s):\n{lines}")


class InputError(EdgeSleepError, ValueError):
    """A batch passed to ``learn``/``predict`` has the wrong shape, dtype or values."""


class StoreError(EdgeSleepError, RuntimeError):
    """The replay store cannot be opened, read or written."""


class StorePathError(StoreError, OSError):
    """The store's path cannot be created or written."""


class StoreBusyError(StoreError):
    """Another writer (a process, or another store object) holds the replay store."""


class StoreKeyError(StoreError):
    """The store is encrypted and the key is missing or wrong, or a sealed field was changed."""


class FingerprintMismatchError(StoreError):
    """The store was written by a model with another architecture."""


class FormatVersionError(EdgeSleepError, RuntimeError):
    """A file or state dict was written by a newer (or unknown) format version."""


class CorruptRecordError(StoreError):
    """A record's checksum does not match its contents."""


class CallOrderError(EdgeSleepError, RuntimeError):
    """A method was called before the one it depends on."""


class ExportError(EdgeSleepError, RuntimeError):
    """An exported program, its weights or its manifest is missing, damaged or mismatched."""


class CheckpointError(EdgeSleepError, OSError):
    """A checkpoint or export folder cannot be written or read: the path is a file, its parent is
    not writable, the disk is full, or a file in the folder is missing or damaged."""


class NativeKernelError(EdgeSleepError, RuntimeError):
    """The compiled kernel was asked for where it could not be built or loaded."""


def check_format_version(owner: str, version: object, supported: int) -> None:
    """Refuse state written by a newer (or an unknown) format version.

    Raises:
        FormatVersionError: ``version`` is not an int or is greater than ``supported``.
    """
    if not isinstance(version, int) or version > supported:
        raise FormatVersionError(
            f"{owner} has format_version={version!r}; this edge-sleep reads versions <= {supported}. "
            "Fix: upgrade edge-sleep, or start from fresh state."
        )


def first_line(e: BaseException, empty: str) -> str:
    r"""The first line of ``e``'s message, for a one-line error that names its cause (``empty``
    when the message is blank).

    >>> first_line(OSError("disk full\nmore detail"), "?"), first_line(EOFError(), "no detail")
    ('disk full', 'no detail')
    """
    return (str(e).strip().splitlines() or [""])[0] or empty
