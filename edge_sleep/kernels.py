"""The consolidation kernel: significance, O(n) exact thresholds, prune and strengthen.

:func:`consolidate_` is the night's Phase 2 on one tensor. It runs the fused C kernel
(:mod:`edge_sleep.native`: no full-size temporary, a few passes over ``F`` and ``w``) on
float32 CPU tensors and NumPy arrays, and :func:`consolidate_radix` otherwise: the same
selection written as plain fixed-shape tensor operations (histograms by ``index_add``, ``cumsum``,
compare, select, multiply), which runs on any device and dtype and is what ``torch.export`` takes.
Both find exact thresholds by radix selection over the bits of the floats: linear in the worst
case, never a sort. The older helpers (:func:`kth_smallest`, :func:`smallest_mask`) are the
readable references they are tested against.

Example:
    >>> import torch
    >>> w = torch.tensor([1.0, -2.0, 0.1, 3.0])
    >>> f = torch.tensor([1.0, 1.0, 1.0, 1.0])
    >>> s = significance(f, w)
    >>> alive = torch.ones(4, dtype=torch.bool)
    >>> keep = alive & ~smallest_mask(s, w, alive, k=1)
    >>> keep.tolist()
    [True, True, False, True]
    >>> consolidate(w, s, keep, strengthen_thr=kth_smallest(s, 3), eta=0.5).tolist()
    [1.0, -2.0, 0.0, 4.5]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["significance", "kth_smallest", "quantile_threshold", "smallest_mask", "consolidate",
           "prune_count", "order_key", "order_key_nonneg", "radix_select", "consolidate_radix", "consolidate_", "ConsolidateResult"]


def significance(fisher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Damage saliency ``s = F * w^2``: the estimated loss increase of zeroing ``w``."""
    return fisher * weight * weight


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest element (1-based) of ``values`` by selection, O(n), no full sort.

    ``torch.kthvalue`` runs quickselect on the CPU. ``k`` is clamped to ``[1, numel]``.
    """
    flat = values.reshape(-1)
    k = min(max(int(k), 1), flat.numel())
    return torch.kthvalue(flat, k).values


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (lower, nearest rank) of ``values`` in O(n)."""
    n = values.numel()
    return kth_smallest(values, max(1, int(round(q * n))))


def prune_count(numel: int, already_pruned: int, prune_frac: float, sparsity_cap: float) -> int:
    """How many more weights to prune tonight: ``prune_frac`` of the alive ones, up to the cap."""
    alive = numel - already_pruned
    room = int(sparsity_cap * numel) - already_pruned
    return max(0, min(int(prune_frac * alive), room))


def smallest_mask(score: torch.Tensor, weight: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``min(k, alive.sum())`` alive entries with the smallest ``score``.

    Ties at the score threshold are broken by the smaller ``|weight|``, and ties in both by the
    lower flat index, so the count is exact whatever the ties. Two O(n) selections and one O(n)
    prefix sum, no sort.
    """
    n_alive = int(alive.sum())
    k = min(int(k), n_alive)
    if k <= 0:
        return torch.zeros_like(alive)
    thr = kth_smallest(score[alive], k)
    below = alive & (score < thr)
    tie = alive & (score == thr)
    need = k - int(below.sum())
    if int(tie.sum()) > need:
        mag = weight.abs()
        wthr = kth_smallest(mag[tie], need)
        smaller = tie & (mag < wthr)
        same = (tie & (mag == wthr)).reshape(-1)
        rest = need - int(smaller.sum())
        # the first `rest` entries (flat order) of those tied in score and |w|
        first = same & (torch.cumsum(same.to(torch.int64), 0) <= rest)
        tie = smaller | first.reshape(tie.shape)
    return below | tie


def consolidate(
    weight: torch.Tensor,
    score: torch.Tensor,
    mask: torch.Tensor,
    *,
    strengthen_thr: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """One branch-free pass: zero the weights outside ``mask``, strengthen over ``strengthen_thr``.

    Args:
        weight: weights, any shape.
        score: significance, same shape.
        mask: bool keep-mask, same shape (``False``: pruned, stays zero).
        strengthen_thr: weights with ``score > strengthen_thr`` are scaled by ``1 + eta``.
        eta: strengthening factor.

    Returns:
        The new weights; the inputs are not modified.
    """
    up = torch.tensor(1.0 + eta, dtype=torch.float64, device=weight.device).to(weight.dtype)
    scale = torch.where(score > strengthen_thr, up, torch.ones_like(up))
    return torch.where(mask, weight * scale, torch.zeros_like(weight))


_BITS_AS_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                torch.float64: torch.int64}


def order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the floats ``x`` (``-0`` and ``+0`` equal), from their bits.

    A non-negative float's bits, read as a signed integer, already sort like the float; a
    negative one's are flipped below zero. No sort, one pass.

    Example:
        >>> order_key(torch.tensor([-1.0, -0.0, 0.0, 2.0])).argsort().tolist() == [0, 1, 2, 3]
        True
    """
    if x.dtype not in _BITS_AS_INT:
        raise TypeError(f"order_key takes float16, bfloat16, float32 or float64, got {x.dtype}")
    x = torch.where(x == 0, torch.zeros_like(x), x)
    bits = x.view(_BITS_AS_INT[x.dtype]).to(torch.int64)
    flip = (1 << (8 * x.element_size() - 1)) - 1
    return torch.where(bits < 0, bits ^ flip, bits)


def order_key_nonneg(x: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of non-negative float32 ``x`` as int64, by arithmetic alone (no bitcast).

    ExecuTorch has no kernel that reinterprets a float's bits, so the exported program rebuilds
    them: the exponent from ``floor(log2(x))`` corrected by one compare either way, the 23
    mantissa bits from ``x / 2^e`` (exact: a power of two), subnormals from ``x * 2^149``. Equal to
    :func:`order_key` on every non-negative float32, subnormals, powers of two and ``inf``
    included (tested); ``-0`` counts as ``+0``. Negative inputs are not supported.
    """
    x = x.abs()  # -0 -> +0; callers pass values that are >= 0
    tiny = x < 2.0 ** -126
    safe = torch.where(tiny | torch.isinf(x), torch.ones_like(x), x)
    e = torch.floor(torch.log2(safe))
    two_e = torch.pow(2.0, e)
    e = torch.where(two_e > safe, e - 1, e)
    e = torch.where(torch.pow(2.0, e + 1) <= safe, e + 1, e)
    mantissa = (safe / torch.pow(2.0, e) - 1.0) * 8388608.0  # an integer in [0, 2^23)
    normal = (e.to(torch.int64) + 127) * 8388608 + mantissa.to(torch.int64)
    subnormal = (x * 2.0 ** 126 * 2.0 ** 23).to(torch.int64)  # 2^149 itself overflows float32
    return torch.where(torch.isinf(x), torch.full_like(normal, 0x7F800000), torch.where(tiny, subnormal, normal))


def radix_select(key: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                 bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k``-th smallest (1-based) of ``key[eligible]``, by radix selection over 16-bit digits.

    Fixed shapes only (a 65,536-bin ``scatter_add`` histogram per digit) and integer division
    instead of shifts, so ``torch.export`` takes it and ExecuTorch's portable kernels run it;
    ``bits / 16`` passes, whatever the values.

    Args:
        key: flat int64 keys of ``bits`` significant bits, signed (:func:`order_key`).
        eligible: flat bool, which keys take part.
        k: 0-d int64 tensor in ``[1, eligible.sum()]``.
        bits: 16, 32 or 64.

    Returns:
        ``(value, below, rank)``: the k-th key, how many eligible keys are smaller, and the rank
        ``k - below`` it has among the eligible keys equal to it.
    """
    take = eligible.to(torch.int64)
    value = torch.zeros((), dtype=torch.int64, device=key.device)
    below = torch.zeros((), dtype=torch.int64, device=key.device)
    bins = torch.arange(1 << 16, dtype=torch.int64, device=key.device)
    for shift in range(bits - 16, -1, -16):
        high = torch.div(key, 1 << shift, rounding_mode="floor") if shift else key  # key >> shift
        if shift == bits - 16:  # the top digit is signed: move it to [0, 65536)
            digit = high + (1 << 15)
        else:
            digit = torch.bitwise_and(high, 0xFFFF)
        hist = torch.zeros(1 << 16, dtype=torch.int64, device=key.device).scatter_add(0, digit, take)
        cum = hist.cumsum(0)
        b = (cum < k).sum()  # the first bin whose running count reaches k
        under = (hist * (bins < b)).sum()
        k = k - under
        below = below + under
        take = take * (digit == b)
        value = value + (b - (1 << 15) if shift == bits - 16 else b) * (1 << shift)
    return value, below, k


def consolidate_radix(weight: torch.Tensor, fisher: torch.Tensor, mask: torch.Tensor, prune: torch.Tensor,
                      strengthen_rank: torch.Tensor, scale: torch.Tensor, *,
                      key_of: Callable[[torch.Tensor], torch.Tensor] = order_key,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 2 on one flat tensor as fixed-shape tensor operations: ``(new_w, new_mask, pruned, strengthened)``.

    Prunes the ``prune`` live weights (``mask``) with the smallest key ``(s, |w|, index)``,
    ``s = F * w * w``, and multiplies the kept weights whose ``s`` exceeds the
    ``strengthen_rank``-th smallest ``s`` by ``scale`` (``strengthen_rank`` 0: none). Scalars are
    0-d tensors (``prune``, ``strengthen_rank`` int64, ``scale`` the weight's dtype); ``prune`` must
    not exceed the live count and ``strengthen_rank`` the size. Exact under any ties (the
    selection is a radix selection on the floats' bits), the same as :func:`smallest_mask` and
    :func:`kth_smallest`. ``key_of`` turns floats into ordered integer keys: :func:`order_key`
    (any float dtype, a bitcast), or :func:`order_key_nonneg` for an ExecuTorch program (float32,
    ``F >= 0``).
    """
    bits = 8 * weight.element_size()
    s = significance(fisher, weight)
    key = key_of(s)
    mag = key_of(weight.abs())
    live = mask
    k = prune.clamp(min=1)
    p_val, _, need = radix_select(key, live, k, bits)
    at_p = live & (key == p_val)
    m_val, _, r = radix_select(mag, at_p, need, bits)
    at_pm = at_p & (mag == m_val)
    position = torch.cumsum(at_pm.to(torch.int64), 0)  # the r-th tied weight in flat order is the last pruned
    cut = live & ((key < p_val) | (at_p & (mag < m_val)) | (at_pm & (position <= r))) & (prune > 0)
    s_val, _, _ = radix_select(key, torch.ones_like(live), strengthen_rank.clamp(min=1), bits)
    keep = live & ~cut
    up = keep & (key > s_val) & (strengthen_rank > 0)
    new_w = torch.where(keep, torch.where(up, weight * scale, weight), torch.zeros_like(weight))
    return new_w, keep, cut.sum(), up.sum()


@dataclass(frozen=True)
class ConsolidateResult:
    """What :func:`consolidate_` did to one tensor."""

    pruned: int
    strengthened: int
    native: bool  # the compiled kernel ran (else the PyTorch form)


def consolidate_(weight: Any, fisher: Any, mask: Any, *, prune: int, strengthen_rank: int | None,
                 eta: float) -> ConsolidateResult:
    """Phase 2 on one tensor, in place: prune ``prune`` live weights, strengthen the most significant.

    ``weight``, ``fisher`` and ``mask`` (bool) are torch tensors or NumPy arrays of one shape. The
    ``min(prune, live)`` live weights of smallest significance ``s = F * w^2`` are pruned (weight
    and mask set to zero), ties broken by the smaller ``|w|`` and then the lower flat index; kept
    weights whose ``s`` exceeds the ``strengthen_rank``-th smallest ``s`` of the whole tensor
    (1-based; ``None``: none) are multiplied by ``1 + eta``.

    float32 CPU data runs the compiled kernel (:mod:`edge_sleep.native`); anything else, or where
    no C compiler is available, runs :func:`consolidate_radix` (same results; it allocates
    full-size temporaries). A NaN significance raises ``InputError`` and changes nothing.
    """
    from edge_sleep import native
    from edge_sleep.errors import InputError

    if isinstance(weight, np.ndarray):
        tensors = [torch.from_numpy(a) for a in (weight, fisher, mask)]
    else:
        tensors = [weight, fisher, mask]
    w, f, m = tensors
    if not (w.shape == f.shape == m.shape):
        raise InputError(f"weight {tuple(w.shape)}, fisher {tuple(f.shape)} and mask {tuple(m.shape)} must "
                         "have one shape")
    if m.dtype != torch.bool:
        raise InputError(f"mask has dtype {m.dtype}; expected torch.bool (True: live)")
    if w.dtype not in _BITS_AS_INT or f.dtype != w.dtype:
        raise InputError(f"weight {w.dtype} and fisher {f.dtype}: expected one float dtype of "
                         f"{sorted(str(d) for d in _BITS_AS_INT)}")
    fast = (w.dtype == torch.float32 and w.device.type == f.device.type == m.device.type == "cpu"
            and w.is_contiguous() and f.is_contiguous() and m.is_contiguous() and native.available())
    if fast:
        r = native.consolidate_(w, f, m, prune=prune, strengthen_rank=strengthen_rank, eta=eta)
        return ConsolidateResult(r.pruned, r.strengthened, True)
    if w.numel() == 0:
        return ConsolidateResult(0, 0, False)
    flat = [t.reshape(-1) for t in (w, f, m)]
    s = significance(flat[1], flat[0])
    if bool(torch.isnan(s).any()):
        raise InputError(f"{int(torch.isnan(s).sum())} significances F * w^2 are NaN; the Fisher and the "
                         "weights must be finite (nothing was changed)")
    live = int(flat[2].sum())
    k = min(max(int(prune), 0), live)
    rank = 0 if strengthen_rank is None or eta == 0 else min(max(int(strengthen_rank), 1), w.numel())
    dev = w.device
    new_w, new_m, pruned, strong = consolidate_radix(
        flat[0], flat[1], flat[2], torch.tensor(k, device=dev), torch.tensor(rank, device=dev),
        torch.tensor(1.0 + eta, dtype=torch.float64, device=dev).to(w.dtype))
    with torch.no_grad():
        w.copy_(new_w.reshape(w.shape))
        m.copy_(new_m.reshape(m.shape))
    return ConsolidateResult(int(pruned), int(strong), False)
