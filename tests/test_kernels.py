from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sleep.kernels import (consolidate, kth_smallest, prune_count, quantile_threshold,
                                significance, smallest_mask)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 500), seed=st.integers(0, 1000), ties=st.booleans())
def test_kth_smallest_matches_sort(n: int, k: int, seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 5, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
    k = min(k, n)
    assert kth_smallest(v, k) == torch.sort(v).values[k - 1]


def test_quantile_threshold_matches_sort() -> None:
    v = torch.randn(1000)
    assert quantile_threshold(v, 0.1) == torch.sort(v).values[99]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 300), k=st.integers(0, 300), seed=st.integers(0, 1000), weight_ties=st.booleans())
def test_smallest_mask_picks_exactly_k_of_the_smallest(n: int, k: int, seed: int, weight_ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (n,), generator=g).float()  # many ties
    weight = (torch.randint(-2, 3, (n,), generator=g).float() if weight_ties  # ties in |w| too
              else torch.randn(n, generator=g))
    alive = torch.rand(n, generator=g) > 0.2
    m = smallest_mask(score, weight, alive, k)
    assert int(m.sum()) == min(k, int(alive.sum()))
    assert not torch.any(m & ~alive)
    if m.any() and (alive & ~m).any():
        kept = alive & ~m
        assert score[m].max() <= score[kept].min()
        # at the threshold score, the smaller |w| goes first
        thr = score[m].max()
        if (kept & (score == thr)).any():
            assert weight[m & (score == thr)].abs().max() <= weight[kept & (score == thr)].abs().min()


def test_smallest_mask_breaks_full_ties_by_position() -> None:
    score, weight = torch.ones(2, 5), torch.full((2, 5), -3.0)
    m = smallest_mask(score, weight, torch.ones(2, 5, dtype=torch.bool), 4)
    assert m.reshape(-1).tolist() == [True] * 4 + [False] * 6


def test_consolidate_prunes_masked_and_strengthens_top() -> None:
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    s = significance(torch.ones(4), w)
    keep = torch.tensor([True, True, False, True])
    out = consolidate(w, s, keep, strengthen_thr=torch.tensor(4.0), eta=0.1)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.0, 3.0 * 1.1]))
    assert w.tolist() == [1.0, -2.0, 0.5, 3.0]  # input untouched


def test_prune_count_respects_cap() -> None:
    assert prune_count(1000, 0, 0.01, 0.2) == 10
    assert prune_count(1000, 195, 0.1, 0.2) == 5
    assert prune_count(1000, 200, 0.1, 0.2) == 0
