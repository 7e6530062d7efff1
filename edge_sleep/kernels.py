"""The consolidation kernel: significance, O(n) quantiles, prune and strengthen (pure).

Written as plain tensor operations (compare, select, multiply) so the same functions run in
PyTorch eagerly, export to an ExecuTorch program and map one element per thread to a GPU.

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

import torch

__all__ = ["significance", "kth_smallest", "quantile_threshold", "smallest_mask", "consolidate",
           "prune_count"]


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
    scale = torch.where(score > strengthen_thr, 1.0 + eta, 1.0).to(weight.dtype)
    return torch.where(mask, weight * scale, torch.zeros_like(weight))
