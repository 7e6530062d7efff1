"""The fused consolidation kernel in C, for NumPy arrays and PyTorch CPU tensors (zero copy).

``consolidate.c`` is compiled on first use with the system's C compiler (``$CC``, else ``cc``)
into a per-user cache (``$EDGE_SLEEP_CACHE``, else ``~/.cache/edge-sleep``), named by a hash of
the source and the flags, and loaded with :mod:`ctypes`. Nothing is compiled at install time and
no Python headers are needed. Where no compiler works, :func:`available` is ``False`` and
:func:`edge_sleep.kernels.consolidate_` uses its pure-PyTorch form (same results, slower);
``EDGE_SLEEP_NATIVE=0`` forces that.

How a call finds its exact thresholds (the k-th smallest live key ``(s, |w|, index)`` to prune
below, and the rank-th smallest ``s`` to strengthen above), in two passes over the tensor:

1. A sample of up to 65,536 weights (runs of 32 at fixed random places) gives each threshold a bracket
   that holds it with high probability. The prune bracket is one of pairs ``(s, |w|)`` compared in
   that order, so a run of ties in ``s`` (such as every ``s = 0``) is already split by ``|w|``.
2. The bracket pass reads ``F``, ``w`` and the mask once: it counts the weights below each
   bracket, marks those inside in a bitmap (an eighth of a byte a weight) and, where few are
   expected, copies their pairs (or keys) out. The exact thresholds then come from the marked
   weights alone: a partition of the copied values, or histograms of the marked weights' keys
   (finished by copying out the last few thousand and a partition).
3. The apply pass prunes, strengthens and updates the mask in place, branch-free.

If a bracket misses (an unlucky sample), radix passes over the whole tensor find that threshold
instead (a histogram of 16-bit digits per pass): linear whatever the values, exact either way.
The significance, an index or any full-size temporary are never materialized. The tensor is
split into one contiguous slice per thread; :mod:`ctypes` releases the GIL during each call, so
plain Python threads run the slices in parallel.

Example:
    >>> import numpy as np
    >>> w = np.array([1.0, -2.0, 0.1, 3.0], dtype=np.float32)
    >>> mask = np.ones(4, dtype=bool)
    >>> r = consolidate_(w, np.ones(4, dtype=np.float32), mask, prune=1, strengthen_rank=3, eta=0.5)
    >>> w.tolist(), mask.tolist(), (r.pruned, r.strengthened)
    ([1.0, -2.0, 0.0, 4.5], [True, True, False, True], (1, 1))
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sleep.errors import InputError, NativeKernelError

__all__ = ["available", "consolidate_", "ConsolidateResult", "library_path"]

_SOURCE = Path(__file__).with_name("consolidate.c")
_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fno-strict-aliasing"]
_NONE = 0xFFFFFFFF  # a prefix no key has
_NO_INDEX = np.iinfo(np.int64).max
_LOW = 0xFFFFFFFF  # the low half of a pair (key << 32 | |w| bits)
_CANDIDATES_FOR_16_BITS = 1 << 18  # from this many marked weights on, selections among them use 16-bit digits
_SAMPLE = 1 << 16  # weights sampled to bracket the thresholds
_GATHER = 1 << 16  # a selection down to this many values finishes by copying them out and partitioning
_MIN_SLICE = 1 << 20  # weights a thread gets at least (below that, handing work over costs more)
_KEYS_BYTES_PER_WEIGHT = 0.5  # room for copied-out keys, per selection, at most this much a weight
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


@dataclass(frozen=True)
class ConsolidateResult:
    """What one call did: counts, and the thresholds it found (as the keys the apply pass used).

    ``prune_key`` is ``(s, |w|, flat index)`` of the last pruned weight, ``None`` when nothing was
    pruned; ``strengthen_above`` is the significance weights had to exceed to be strengthened
    (``inf``: none).
    """

    pruned: int
    strengthened: int
    prune_key: tuple[float, float, int] | None
    strengthen_above: float


def _cache_dir() -> Path:
    root = os.environ.get("EDGE_SLEEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edge-sleep")
    return Path(root) / "native"


def library_path() -> Path:
    """Where the compiled kernel is (or would be) cached for this source, compiler and flags."""
    cc = os.environ.get("CC", "cc")
    tag = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS, sys.platform]).encode()).hexdigest()[:16]
    return _cache_dir() / f"consolidate-{tag}.so"


def _build(path: Path) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler {cc!r} on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, path)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if os.environ.get("EDGE_SLEEP_NATIVE", "1") == "0":
            _failed = "EDGE_SLEEP_NATIVE=0"
            return None
        path = library_path()
        try:
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            _failed = str(e)
            return None
        p, i64, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32
        c_int = ctypes.c_int
        lib.es_hist_first.argtypes = [p, p, p, i64, c_int, p]
        lib.es_hist_first.restype = i64
        lib.es_hist_next.argtypes = [p, p, p, i64, c_int, u32, u32, c_int, u32, p, p, p]
        lib.es_hist_next.restype = None
        lib.es_keep_key.argtypes = [p, p, p, i64, u32, c_int, p]
        lib.es_keep_key.restype = i64
        lib.es_hist_mag_at.argtypes = [p, p, i64, c_int, u32, c_int, u32, p]
        lib.es_hist_mag_at.restype = None
        lib.es_gather_mag_at.argtypes = [p, p, i64, c_int, u32, p, i64]
        lib.es_gather_mag_at.restype = i64
        lib.es_gather_key_at.argtypes = [p, p, p, i64, c_int, u32, p, i64]
        lib.es_gather_key_at.restype = i64
        lib.es_nth_pair_at.argtypes = [p, p, p, i64, u32, u32, i64, p]
        lib.es_nth_pair_at.restype = i64
        lib.es_nth_mag_at.argtypes = [p, p, i64, u32, i64, p]
        lib.es_nth_mag_at.restype = i64
        lib.es_sample_keys.argtypes = [p, p, p, p, i64, i64, p, p]
        lib.es_sample_keys.restype = i64
        lib.es_count_live.argtypes = [p, i64]
        lib.es_count_live.restype = i64
        lib.es_bracket.argtypes = [p, p, p, i64, u32, u32, u32, u32, u32, u32, p, p, p, i64, p, i64, p]
        lib.es_bracket.restype = None
        lib.es_hist_key_at.argtypes = [p, p, p, i64, c_int, u32, c_int, u32, p]
        lib.es_hist_key_at.restype = None
        lib.es_apply.argtypes = [p, p, p, i64, u32, u32, u32, ctypes.c_float, p]
        lib.es_apply.restype = None
        _lib = lib
        return lib


def available() -> bool:
    """Whether the compiled kernel can be used here (it is built on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when it is not)."""
    _load()
    return _failed


def _threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover - torch is a dependency; NumPy callers may lack it one day
        return max(1, os.cpu_count() or 1)


def _run(bounds: list[tuple[int, int]], fn: Any) -> list[Any]:
    """Call ``fn(j, start, stop)`` for every slice ``j`` in parallel: slice 0 on the calling thread,
    the others on a pool (one hand-off fewer than pooling them all)."""
    global _pool, _pool_size
    t = len(bounds)
    if t == 1:
        return [fn(0, *bounds[0])]
    with _lock:
        if _pool is None or _pool_size < t - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(t - 1, thread_name_prefix="edge-sleep-kernel"), t - 1
        pool = _pool
    rest = [pool.submit(fn, j, *bounds[j]) for j in range(1, t)]
    first = fn(0, *bounds[0])
    return [first, *(f.result() for f in rest)]


def _break_ties_among(lib: ctypes.CDLL, pw: int, pf: int, bounds: list[tuple[int, int]],
                      candidates: list[np.ndarray], marked: int, key: int, k: int) -> tuple[int, int]:
    """The prune key's |w| and index parts: the k-th (|w|, index) among live weights with this key.

    ``candidates`` are, per slice, bitmaps of the marked live weights (``marked`` of them) that
    hold every live weight with this key not already counted below it; they are first narrowed to
    the key itself, in place, which also gives the histogram of |w|'s first digit (16-bit digits
    for ``marked`` of at least ``_CANDIDATES_FOR_16_BITS``, else 11-bit ones). Slices run in
    parallel. Returns ``(mag bits, flat index or _NO_INDEX)``.
    """
    digits = (16, 16) if marked >= _CANDIDATES_FOR_16_BITS else (11, 11, 10)
    first = _digit_histogram(bounds, digits[0], lambda j, a, out: lib.es_keep_key(
        pw + 4 * a, pf + 4 * a, candidates[j].ctypes.data, candidates[j].size, key, 32 - digits[0], out))
    sel = _select_digits(bounds, digits[1:], _Selection(first, k), 32 - digits[0],
                         lambda j, a, shift, prefix, d, out: lib.es_hist_mag_at(
                             pw + 4 * a, candidates[j].ctypes.data, candidates[j].size, shift, prefix, shift - d,
                             (1 << d) - 1, out),
                         lambda j, a, shift, prefix, out, cap: lib.es_gather_mag_at(
                             pw + 4 * a, candidates[j].ctypes.data, candidates[j].size, shift, prefix, out, cap))
    if sel.tied <= sel.k:
        return sel.prefix, _NO_INDEX
    # ties in both: the k-th of them in flat order is the last one pruned
    return sel.prefix, _nth_marked(bounds, candidates, sel.k, lambda a, bits, r, count: lib.es_nth_mag_at(
        pw + 4 * a, bits.ctypes.data, bits.size, sel.prefix, r, count))


def _nth_marked(bounds: list[tuple[int, int]], bitmaps: list[np.ndarray], r: int, nth: Any) -> int:
    """The flat index of the r-th (1-based) marked weight in flat order that ``nth(start, bitmap,
    r, count_pointer)`` looks for (it returns the slice index or -1, and stores how many it saw)."""
    for (a, _), bits in zip(bounds, bitmaps):
        count = ctypes.c_int64(0)
        at = nth(a, bits, r, ctypes.byref(count))
        if at >= 0:
            return a + int(at)
        r -= count.value
    raise AssertionError("unreachable: the selection counted more ties than the marked weights hold")


def _written(*arrays: Any) -> None:
    """Tell autograd that torch tensors changed behind its back (their version counters)."""
    for a in arrays:
        if not isinstance(a, np.ndarray):
            import torch

            torch.autograd.graph.increment_version(a)


def _pointer(a: Any) -> tuple[int, int, bool, str, tuple[int, ...], Any]:
    """(address, numel, contiguous, dtype name, shape, device) of a NumPy array or a torch tensor."""
    if isinstance(a, np.ndarray):
        return a.ctypes.data, a.size, bool(a.flags.c_contiguous), str(a.dtype), a.shape, "cpu"
    import torch

    if isinstance(a, torch.Tensor):
        name = {torch.float32: "float32", torch.bool: "bool"}.get(a.dtype, str(a.dtype))
        return a.data_ptr(), a.numel(), a.is_contiguous(), name, tuple(a.shape), a.device.type
    raise InputError(f"expected a NumPy array or a torch tensor, got {type(a).__name__}")


class _Selection:
    """A radix selection of the k-th smallest key, one digit at a time.

    ``prefix`` is the key's digits found so far, ``k`` the rank still wanted among the keys with
    that prefix, ``below`` how many keys lie under the prefix, ``tied`` how many share it.
    """

    def __init__(self, hist: np.ndarray, k: int) -> None:
        self.prefix, self.below, self.k, self.tied = 0, 0, k, 0
        self.refine(hist, 0)

    @classmethod
    def known(cls, key: int, k: int, tied: int) -> _Selection:
        """A finished selection: the key, the rank wanted among the ``tied`` weights that have it."""
        sel = cls.__new__(cls)
        sel.prefix, sel.below, sel.k, sel.tied = key, 0, k, tied
        return sel

    def refine(self, hist: np.ndarray, bits: int) -> None:
        cum = np.cumsum(hist, dtype=np.int64)
        b = int(np.searchsorted(cum, self.k, side="left"))
        under = int(cum[b - 1]) if b else 0
        self.prefix = (self.prefix << bits) | b
        self.below += under
        self.k -= under
        self.tied = int(hist[b])


def keys_of(s: np.ndarray) -> np.ndarray:
    """The C kernel's unsigned order keys of float32 values (``-0`` as ``+0``), in NumPy."""
    u = s.astype(np.float32, copy=False).view(np.uint32).copy()
    u[s == 0] = 0
    neg = (u >> np.uint32(31)).astype(bool)
    return np.where(neg, ~u, u | np.uint32(0x80000000))


@functools.lru_cache(maxsize=16)
def _sample_runs(n: int) -> tuple[np.ndarray, int]:
    """Where :func:`_brackets` samples a tensor of ``n`` weights: ``(run starts, run length)``, up to
    ``_SAMPLE`` weights (one in 64, at least 1,024; all of them when fewer) as runs of 32 at random
    places (cheap to read), fixed by ``n`` so that runs repeat (a night calls the kernel on the
    same shapes again)."""
    size = min(_SAMPLE, max(n // 64, 1024))  # its temporaries stay under a byte a weight
    if n <= size:
        return np.zeros(1, np.int64), n
    starts = np.sort(np.random.default_rng(n).integers(0, n - 32, size // 32)).astype(np.int64)
    starts.flags.writeable = False
    return starts, 32


def _brackets(lib: ctypes.CDLL, pw: int, pf: int, pm: int, k: int, live: int, rank: int | None,
              n: int) -> tuple[int, int, int, int, int, int]:
    """Brackets ``(lo_p, hi_p, lo_s, hi_s)`` that hold, with high probability, the k-th live weight
    in prune order (as a pair ``key << 32 | |w| bits``, so ties in the key are split by |w| in the
    bracket pass already) and the rank-th key, from a sample of up to ``_SAMPLE`` weights (see
    :func:`_sample_runs`); and the number of weights each is expected to hold.

    A bracket spans the estimated rank plus or minus eight standard deviations of a sample
    quantile (four, doubled because neighbours in a run are alike) and four more; an empty one
    (``lo > hi``) stands for a selection not wanted. If the
    rank falls outside the bracket after all, the caller runs the radix passes instead: the
    result is exact either way, only the time differs.
    """
    starts, run = _sample_runs(n)
    keys = np.empty(starts.size * run, np.uint32)
    live_pairs = np.empty(keys.size, np.uint64)
    live_pairs = live_pairs[: lib.es_sample_keys(pw, pf, pm, starts.ctypes.data, starts.size, run,
                                                 keys.ctypes.data, live_pairs.ctypes.data)]

    def bracket(sample: np.ndarray, want: int, population: int) -> tuple[int, int]:
        m = sample.size
        if m == 0 or population == 0:
            return 0, int(np.iinfo(sample.dtype).max)  # nothing to estimate from: mark everything
        q = min(max(want / population, 0.0), 1.0)
        spread = 8.0 * math.sqrt(m * q * (1.0 - q)) + 4.0
        lo_i, hi_i = math.floor(q * m - spread) - 1, math.ceil(q * m + spread) - 1
        at = [i for i in (lo_i, hi_i) if 0 <= i < m]
        ordered = np.partition(sample, at) if at else sample  # the two order statistics, not a sort
        lo = int(ordered[lo_i]) if lo_i >= 0 else 0
        hi = int(ordered[hi_i]) if hi_i < m else int(np.iinfo(sample.dtype).max)
        return lo, hi

    def expected(sample: np.ndarray, lo: int, hi: int, population: int) -> int:
        return int(np.count_nonzero((sample >= lo) & (sample <= hi)) / max(sample.size, 1) * population) + 1

    lo_p, hi_p = bracket(live_pairs, k, live) if k else (1, 0)
    lo_s, hi_s = bracket(keys, rank, n) if rank is not None else (1, 0)
    return (lo_p, hi_p, lo_s, hi_s, expected(live_pairs, lo_p, hi_p, live) if k else 0,
            expected(keys, lo_s, hi_s, n) if rank is not None else 0)


def _select_values(values: np.ndarray, k: int) -> _Selection:
    """The k-th smallest of ``values`` (1-based), as a finished selection; reorders ``values``."""
    values.partition(k - 1)  # in place: no copy of what may be megabytes
    key = int(values[k - 1])
    below = int(np.count_nonzero(values < key))
    return _Selection.known(key, k - below, int(np.count_nonzero(values == key)))


def _joined(parts: list[np.ndarray], counts: Any) -> np.ndarray:
    """The first ``counts[j]`` values of each part, end to end (the part itself when there is one)."""
    if len(parts) == 1:
        return parts[0][: int(counts[0])]
    return np.concatenate([p[: int(c)] for p, c in zip(parts, counts)])


def _select_keys(keys: list[np.ndarray], counts: np.ndarray, k: int) -> _Selection:
    """The k-th smallest of the keys the bracket pass copied out (``counts[j]`` in slice j)."""
    return _select_values(_joined(keys, counts), k)


def _select_marked(lib: ctypes.CDLL, pw: int, pf: int, bounds: list[tuple[int, int]], bitmaps: list[np.ndarray],
                   count: int, k: int) -> _Selection:
    """The k-th smallest key among the marked weights (``count`` of them), digit by digit."""
    digits = (16, 16) if count >= _CANDIDATES_FOR_16_BITS else (11, 11, 10)
    shift = 32 - digits[0]
    first = _digit_histogram(bounds, digits[0], lambda j, a, out: lib.es_hist_key_at(
        pw + 4 * a, pf + 4 * a, bitmaps[j].ctypes.data, bitmaps[j].size, 32, 0, shift, (1 << digits[0]) - 1, out))
    return _select_digits(bounds, digits[1:], _Selection(first, k), shift,
                          lambda j, a, shift, prefix, d, out: lib.es_hist_key_at(
                              pw + 4 * a, pf + 4 * a, bitmaps[j].ctypes.data, bitmaps[j].size, shift, prefix,
                              shift - d, (1 << d) - 1, out),
                          lambda j, a, shift, prefix, out, cap: lib.es_gather_key_at(
                              pw + 4 * a, pf + 4 * a, bitmaps[j].ctypes.data, bitmaps[j].size, shift, prefix, out,
                              cap))


def _digit_histogram(bounds: list[tuple[int, int]], bits: int, fill: Any) -> np.ndarray:
    """One histogram of ``2**bits`` bins over all slices: ``fill(j, start, out_address)`` counts
    slice ``j`` into its own array (in parallel); the arrays are summed."""
    buf = np.zeros((len(bounds), 1 << bits), np.uint32)
    _run(bounds, lambda j, a, b: fill(j, a, buf[j].ctypes.data))
    return buf[0] if len(bounds) == 1 else buf.sum(axis=0, dtype=np.int64)


def _select_digits(bounds: list[tuple[int, int]], digits: Sequence[int], sel: _Selection, shift: int,
                   hist: Any, gather: Any) -> _Selection:
    """Refine ``sel`` by the next ``digits``, below bit ``shift``: for each, ``hist(j, start, shift,
    prefix, bits, out_address)`` counts slice ``j``'s next digit among the values with that prefix.

    Once at most ``_GATHER`` values share the prefix, ``gather(j, start, shift, prefix,
    out_address, capacity)`` copies slice ``j``'s out instead (returning how many it has), and a
    partition finishes the selection: one pass over the marked weights, with no histogram to
    zero and add up.
    """
    for d in digits:
        if sel.tied <= _GATHER:
            break
        prefix = sel.prefix
        sel.refine(_digit_histogram(bounds, d, lambda j, a, out: hist(j, a, shift, prefix, d, out)), d)
        shift -= d
    else:
        return sel
    bufs = [np.empty(sel.tied, np.uint32) for _ in bounds]
    got = np.zeros(len(bounds), np.int64)
    _run(bounds, lambda j, a, b: got.__setitem__(j, gather(j, a, shift, sel.prefix, bufs[j].ctypes.data, sel.tied)))
    values = _joined(bufs, got)
    assert values.size == sel.tied, "the gather found another count than the histograms"
    return _select_values(values, sel.k)


def _select_by_passes(lib: ctypes.CDLL, pw: int, pf: int, pm: int, bounds: list[tuple[int, int]], n: int, k: int,
                      rank: int | None) -> tuple[_Selection | None, _Selection | None, list[np.ndarray] | None, int]:
    """Radix selection by passes over the whole tensor (a histogram per digit): the k-th live key
    (``k`` 0: none) and the rank-th key (``None``: none), both in each pass. The last pass marks
    the live weights of the prune bin. Returns ``(prune selection, strengthening selection, marked
    bitmaps, how many are marked)``. Linear whatever the values; used when a sampled bracket missed.
    """
    t = len(bounds)
    digits = _digits(n, t)
    shift = 32 - digits[0]
    packed = np.zeros((t, 1 << digits[0]), np.uint64)
    _run(bounds, lambda j, a, b: lib.es_hist_first(pw + 4 * a, pf + 4 * a, pm + a, b - a, shift,
                                                   packed[j].ctypes.data))
    h_all = (packed & np.uint64(0xFFFFFFFF)).sum(axis=0, dtype=np.int64)
    h_alive = (packed >> np.uint64(32)).sum(axis=0, dtype=np.int64)
    sel_p = _Selection(h_alive, k) if k else None
    sel_s = _Selection(h_all, rank) if rank is not None else None
    candidates: list[np.ndarray] | None = None
    marked = 0
    for level, d in enumerate(digits[1:], start=1):
        dshift = shift - d
        if level == len(digits) - 1 and sel_p is not None:
            marked = sel_p.tied  # live weights in the prune bin, marked by this last pass
            candidates = [np.zeros((b - a + 63) // 64, np.uint64) for a, b in bounds]
        buf = np.zeros((t, 2, (1 << d) + 8), np.uint32)  # 8 spare slots (see es_hist_next)
        p_prefix = _NONE if sel_p is None else sel_p.prefix
        s_prefix = _NONE if sel_s is None else sel_s.prefix

        def next_digit(j: int, a: int, b: int) -> None:
            lib.es_hist_next(pw + 4 * a, pf + 4 * a, pm + a, b - a, shift, p_prefix, s_prefix, dshift, (1 << d) - 1,
                             None if candidates is None else candidates[j].ctypes.data,
                             buf[j, 0].ctypes.data, buf[j, 1].ctypes.data)

        _run(bounds, next_digit)
        nxt = buf[:, :, : 1 << d].sum(axis=0, dtype=np.int64)
        if sel_p is not None:
            sel_p.refine(nxt[0], d)
        if sel_s is not None:
            sel_s.refine(nxt[1], d)
        shift = dshift
    return sel_p, sel_s, candidates, marked


def _digits(n: int, threads: int) -> tuple[int, ...]:
    """Digit widths of the radix selection: 16 + 16 bits (two passes) where the histograms cost
    under a byte a weight, else 11 + 11 + 10 (three passes, 16 KiB of histograms a thread)."""
    per_thread = (1 << 16) * 8 + 2 * (1 << 16) * 4
    return (16, 16) if per_thread * threads <= n else (11, 11, 10)


def _float_of(key: int) -> float:
    u = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def consolidate_(weight: Any, fisher: Any, mask: Any, *, prune: int, strengthen_rank: int | None,
                 eta: float, threads: int | None = None) -> ConsolidateResult:
    """Phase 2 on one tensor, in place: prune ``prune`` live weights, strengthen the top ones.

    The pruned weights are the ``prune`` live ones (``mask`` true) of smallest significance
    ``s = F * w * w``, ties broken by the smaller ``|w|`` and then the lower flat index, so exactly
    ``min(prune, live)`` go whatever the ties. A kept weight whose ``s`` exceeds the
    ``strengthen_rank``-th smallest ``s`` of the whole tensor (1-based; ``None``: no strengthening)
    is multiplied by ``1 + eta``. Pruned weights and their mask entries become 0.

    Args:
        weight: float32, contiguous, CPU (NumPy array or torch tensor); updated in place.
        fisher: float32, same shape; read only.
        mask: bool, same shape; updated in place.
        prune: how many live weights to prune (clamped to the live count).
        strengthen_rank: the rank of the strengthening threshold, in ``[1, numel]``.
        eta: strengthening factor.
        threads: threads to use (default: ``torch.get_num_threads()``).

    Raises:
        InputError: wrong type, dtype, shape, device or layout, or a NaN significance; nothing
            is changed then.
        NativeKernelError: the compiled kernel is not available (see :func:`unavailable_reason`).
    """
    lib = _load()
    if lib is None:
        raise NativeKernelError(f"the compiled consolidation kernel is not available ({_failed}). Fix: install "
                                "a C compiler (or set CC), or call edge_sleep.kernels.consolidate_, which "
                                "falls back to PyTorch")
    pw, n, cw, dw, sw, devw = _pointer(weight)
    pf, nf, cf, df, sf, devf = _pointer(fisher)
    pm, nm, cm, dm, sm, devm = _pointer(mask)
    for name, dt, want in (("weight", dw, "float32"), ("fisher", df, "float32"), ("mask", dm, "bool")):
        if dt != want:
            raise InputError(f"{name} has dtype {dt}; expected {want}. Convert it, or use "
                             "edge_sleep.kernels.consolidate_, which takes any float dtype")
    if not (sw == sf == sm):
        raise InputError(f"weight {sw}, fisher {sf} and mask {sm} must have one shape")
    if not (cw and cf and cm):
        raise InputError("weight, fisher and mask must be contiguous; call .contiguous() first "
                         "(the kernel updates weight and mask in place)")
    if not (devw == devf == devm == "cpu"):
        raise InputError(f"the compiled kernel runs on CPU tensors, got {devw}/{devf}/{devm}; "
                         "use edge_sleep.kernels.consolidate_ on other devices")
    if n == 0:
        return ConsolidateResult(0, 0, None, float("inf"))
    t = max(1, min(_threads(threads), n // _MIN_SLICE or 1))
    bounds = [(n * j // t, n * (j + 1) // t) for j in range(t)]

    live_parts = np.zeros(t, np.int64)
    _run(bounds, lambda j, a, b: live_parts.__setitem__(j, lib.es_count_live(pm + a, b - a)))
    live = int(live_parts.sum())
    k = min(max(int(prune), 0), live)
    rank = None if strengthen_rank is None or eta == 0 else min(max(int(strengthen_rank), 1), n)

    # brackets from a sample, then one pass that counts below them and marks the weights inside
    lo_p, hi_p, lo_s, hi_s, est_p, est_s = _brackets(lib, pw, pf, pm, k, live, rank, n)
    bits_p = [np.empty((b - a + 63) // 64, np.uint64) for a, b in bounds]
    bits_s = [np.empty((b - a + 63) // 64, np.uint64) for a, b in bounds]
    counts = np.zeros((t, 5), np.int64)
    # the marked weights' pairs and keys too, where few are expected (room for the estimate and a quarter)
    cap_p = 0 if not k else min(n, (est_p + est_p // 4) // t + 4096)
    cap_s = 0 if rank is None else min(n, (est_s + est_s // 4) // t + 4096)
    budget = _KEYS_BYTES_PER_WEIGHT * n
    pairs_p = [np.empty(cap_p, np.uint64) for _ in bounds] if cap_p and cap_p * 8 * t <= budget else None
    keys_s = [np.empty(cap_s, np.uint32) for _ in bounds] if cap_s and cap_s * 4 * t <= budget else None
    _run(bounds, lambda j, a, b: lib.es_bracket(pw + 4 * a, pf + 4 * a, pm + a, b - a, lo_p >> 32, lo_p & _LOW,
                                                hi_p >> 32, hi_p & _LOW, lo_s, hi_s,
                                                bits_p[j].ctypes.data, bits_s[j].ctypes.data,
                                                None if pairs_p is None else pairs_p[j].ctypes.data, cap_p,
                                                None if keys_s is None else keys_s[j].ctypes.data, cap_s,
                                                counts[j].ctypes.data))
    per_slice = counts.copy()
    below_p, in_p, below_s, in_s, nans = (int(c) for c in counts.sum(axis=0))
    if nans:
        raise InputError(f"{nans} significances F * w^2 are NaN; the Fisher and the weights must be "
                         "finite (nothing was changed)")
    p_key: int | None = None
    p_mag, p_index = 0xFFFFFFFF, _NO_INDEX  # 0xFFFFFFFF: above every |w|, so no tie to split
    sel_p: _Selection | None = None
    sel_s: _Selection | None = None
    candidates: list[np.ndarray] | None = bits_p
    marked = in_p
    if k and below_p < k <= below_p + in_p:  # the k-th live weight is among the marked ones
        if pairs_p is not None and all(per_slice[j, 1] <= cap_p for j in range(t)):
            pair = _select_keys(pairs_p, per_slice[:, 1], k - below_p)  # its key and |w| at once
            p_key, p_mag = pair.prefix >> 32, pair.prefix & _LOW
            if pair.tied > pair.k:  # ties in both: the pair.k-th of them in flat order is the last pruned
                p_index = _nth_marked(bounds, bits_p, pair.k, lambda a, bits, r, count: lib.es_nth_pair_at(
                    pw + 4 * a, pf + 4 * a, bits.ctypes.data, bits.size, p_key, p_mag, r, count))
        else:
            sel_p = _select_marked(lib, pw, pf, bounds, bits_p, in_p, k - below_p)
    if rank is not None and below_s < rank <= below_s + in_s:
        if keys_s is not None and all(per_slice[j, 3] <= cap_s for j in range(t)):
            sel_s = _select_keys(keys_s, per_slice[:, 3], rank - below_s)
        else:
            sel_s = _select_marked(lib, pw, pf, bounds, bits_s, in_s, rank - below_s)
    del bits_s
    prune_missed = bool(k) and p_key is None and sel_p is None
    if prune_missed or (rank is not None and sel_s is None):  # a bracket missed
        missed_p, missed_s, found_candidates, found_marked = _select_by_passes(
            lib, pw, pf, pm, bounds, n, k if prune_missed else 0, rank if sel_s is None else None)
        if prune_missed:
            sel_p, candidates, marked = missed_p, found_candidates, found_marked
        if sel_s is None and rank is not None:
            sel_s = missed_s
    if sel_p is not None:
        p_key = sel_p.prefix
        if sel_p.tied > sel_p.k:
            # ties at the prune key: select the remaining sel_p.k among them by |w|, then by position
            assert candidates is not None
            p_mag, p_index = _break_ties_among(lib, pw, pf, bounds, candidates, marked, sel_p.prefix, sel_p.k)
    s_key = None if sel_s is None else sel_s.prefix

    # the apply pass
    if p_key is None:
        p_key, p_mag, p_index = 0, 0, -1  # prune nothing: no key is below (0, 0)
    s_eff = 0xFFFFFFFF if s_key is None else s_key  # no key is above 0xFFFFFFFF
    scale = float(np.float32(1.0 + eta))
    # weights tied in key and |w| are pruned up to flat index p_index: below it |w| <= p_mag is
    # pruned (bound p_mag + 1), after it |w| < p_mag; 0xFFFFFFFF bounds every |w| (no tie to split)
    split = min(max(p_index + 1, 0), n)
    inclusive = p_mag + 1 if p_mag != 0xFFFFFFFF else p_mag

    totals = np.zeros((t, 2), np.int64)

    def apply(j: int, a: int, b: int) -> None:
        for lo_i, hi_i, bound in ((a, min(b, split), inclusive), (max(a, split), b, p_mag)):
            if hi_i > lo_i:
                lib.es_apply(pw + 4 * lo_i, pf + 4 * lo_i, pm + lo_i, hi_i - lo_i, p_key, bound, s_eff, scale,
                             totals[j].ctypes.data)

    _run(bounds, apply)
    totals = totals.sum(axis=0)
    _written(weight, mask)
    key = None
    if totals[0]:
        mag = float(np.array([p_mag], np.uint32).view(np.float32)[0]) if p_mag != 0xFFFFFFFF else float("inf")
        key = (_float_of(p_key), mag, int(p_index) if p_index != _NO_INDEX else n - 1)
    above = float("inf") if s_eff == 0xFFFFFFFF else _float_of(s_key)  # type: ignore[arg-type]
    return ConsolidateResult(int(totals[0]), int(totals[1]), key, above)
