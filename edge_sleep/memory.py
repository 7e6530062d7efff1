"""Measured memory: the peak resident set of a block of code (Linux), and activation bytes.

:class:`ResidentPeak` resets the kernel's record of this process's peak resident set (writing 5
to ``/proc/self/clear_refs``) on entry and reads it (``VmHWM``) on exit: the difference from the
resident set at entry is what the block added at its worst moment, counting everything (tensors,
the C libraries' buffers, allocator slack), which is what a phone's memory limit sees. Where the
kernel offers neither file (not Linux, or a sandbox) ``extra_bytes`` is ``None``. Resetting the
record is process-wide: a caller that reads ``VmHWM`` itself sees it restart.

:func:`saved_activation_bytes` counts what autograd keeps for backward during a forward.

Memory the process freed earlier and reuses does not grow the resident set, so a block's figure
counts what it newly touched: the one-time costs of its first run too (measure a second run to
leave those out), and not what it got back from an earlier one.

Example:
    >>> import mmap
    >>> with ResidentPeak() as peak:  # 64 MB of fresh anonymous pages, each touched once
    ...     block = mmap.mmap(-1, 64 << 20)
    ...     for offset in range(0, 64 << 20, 4096):
    ...         block[offset] = 1
    >>> peak.extra_bytes is None or peak.extra_bytes >= 60 << 20
    True
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

__all__ = ["ResidentPeak", "peak_resident_bytes", "release_free_memory", "resident_bytes", "saved_activation_bytes"]


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> int | None:
    """This process's resident set now (``VmRSS``); ``None`` off Linux."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int | None:
    """This process's peak resident set so far (``VmHWM``); ``None`` off Linux."""
    return _status_bytes("VmHWM")


class ResidentPeak:
    """``with ResidentPeak() as p: ...`` then ``p.extra_bytes``: the block's peak resident growth."""

    def __init__(self) -> None:
        self.extra_bytes: int | None = None
        self._before: int | None = None

    def __enter__(self) -> ResidentPeak:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return self
        self._before = _status_bytes("VmRSS")
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        peak = _status_bytes("VmHWM")
        if self._before is not None and peak is not None:
            self.extra_bytes = max(0, peak - self._before)


_TRIM: Any = None  # glibc's malloc_trim once looked up; False where the C library has none


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim(0)``).

    CPU tensors live on the C heap. Memory a computation frees stays in the process's resident
    set until the allocator returns it, and the heap's free pieces are reused only by requests
    that fit them, so a loop whose tensors change size (a backward pass: activations freed,
    gradients of other shapes allocated) grows the resident set a little each time round. A
    memory limit counts the resident set. Returning the free pages costs the next allocations
    their page faults again. Returns whether it could (``False`` off glibc: macOS, musl, Windows).
    """
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(None).malloc_trim
            _TRIM.argtypes, _TRIM.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM is False:
        return False
    _TRIM(0)
    return True


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude: set[int] | None = None) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs (each storage once).

    Storages whose data pointer is in ``exclude`` (the parameters, say) are not counted.
    """
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    skip = exclude or set()
    return sum(b for ptr, b in seen.items() if ptr not in skip)
