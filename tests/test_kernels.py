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


# --- the fused kernel (edge_sleep.native) and its PyTorch form, against a sort-based reference ---

import numpy as np
import pytest

from edge_sleep import native
from edge_sleep.errors import InputError, NativeKernelError
from edge_sleep.kernels import consolidate_, consolidate_radix, order_key, order_key_nonneg

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def sort_reference(w: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, k: int, rank: int | None,
                   eta: float) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Phase 2 by full sorts (what pruning libraries do): lexsort of live (s, |w|, index), sorted s."""
    s = significance(f, w).double().reshape(-1).numpy()
    mag = w.abs().double().reshape(-1).numpy()
    keep = mask.reshape(-1).numpy().copy()
    live = np.flatnonzero(keep)
    order = live[np.lexsort((live, mag[live], s[live]))]
    k = min(k, live.size)
    keep[order[:k]] = False
    up = keep & (s > np.sort(s)[rank - 1]) if rank is not None and eta > 0 else np.zeros_like(keep)
    scale = torch.tensor(1.0 + eta, dtype=torch.float64).to(w.dtype)
    flat = w.reshape(-1)
    out = torch.where(torch.from_numpy(keep), torch.where(torch.from_numpy(up), flat * scale, flat),
                      torch.zeros_like(flat))
    return out.reshape(w.shape), torch.from_numpy(keep).reshape(mask.shape), k, int(up.sum())


def case(seed: int, n: int, ties: str, dtype: torch.dtype, dead: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if ties == "none":
        w, f = torch.randn(n, generator=g), torch.rand(n, generator=g) ** 3
    elif ties == "fisher":  # many equal significances, distinct |w|
        w, f = torch.randn(n, generator=g), torch.randint(0, 3, (n,), generator=g).float()
    else:  # ties in s and in |w|: the flat index decides
        w, f = torch.randint(-2, 3, (n,), generator=g).float(), torch.randint(0, 2, (n,), generator=g).float()
    mask = torch.rand(n, generator=g) >= dead
    return (w * mask).to(dtype), f.to(dtype), mask


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 10**6), ties=st.sampled_from(["none", "fisher", "both"]),
       dtype=st.sampled_from(DTYPES), dead=st.sampled_from([0.0, 0.2, 0.9]), kf=st.floats(0, 1.2),
       rf=st.floats(0, 1), eta=st.sampled_from([0.0, 0.1]))
def test_consolidate_matches_the_sort_reference(n: int, seed: int, ties: str, dtype: torch.dtype, dead: float,
                                                kf: float, rf: float, eta: float) -> None:
    w, f, mask = case(seed, n, ties, dtype, dead)
    k, rank = int(kf * n), max(1, int(rf * n))
    want_w, want_m, want_pruned, want_up = sort_reference(w, f, mask, k, rank, eta)
    w2, m2 = w.clone(), mask.clone()
    done = consolidate_(w2, f, m2, prune=k, strengthen_rank=rank, eta=eta)
    assert done.native == (dtype == torch.float32 and native.available())  # float32 CPU: the C kernel
    assert torch.equal(m2, want_m) and torch.equal(w2, want_w)
    assert (done.pruned, done.strengthened) == (want_pruned, want_up)
    # the PyTorch form alone, on every dtype
    got = consolidate_radix(w.reshape(-1), f.reshape(-1), mask.reshape(-1), torch.tensor(want_pruned),
                            torch.tensor(rank if eta else 0), torch.tensor(1.0 + eta, dtype=torch.float64).to(dtype))
    assert torch.equal(got[0], want_w.reshape(-1)) and torch.equal(got[1], want_m.reshape(-1))
    assert (int(got[2]), int(got[3])) == (want_pruned, want_up)


PATHS = {
    # the sampled brackets, the thresholds found among the copied-out keys
    "sampled": {},
    # the same, from histograms of the marked weights (no room for copied keys)
    "sampled, bitmaps": {"_KEYS_BYTES_PER_WEIGHT": 0.0},
    # brackets that hold everything, with too little room for the keys they were expected to hold
    "wide brackets, keys overflow": {"_brackets": lambda *a: (0, 2**64 - 1, 0, 0xFFFFFFFF, 0, 0)},
    # brackets that miss: radix passes over the tensor, with each digit schedule
    "missed, 16+16": {"_brackets": lambda *a: (1, 0, 1, 0, 0, 0), "_digits": lambda n, t: (16, 16)},
    "missed, 11+11+10": {"_brackets": lambda *a: (1, 0, 1, 0, 0, 0), "_digits": lambda n, t: (11, 11, 10)},
    "missed, 8x4": {"_brackets": lambda *a: (1, 0, 1, 0, 0, 0), "_digits": lambda n, t: (8, 8, 8, 8)},
}


# the C kernel's own tests; where no compiler works, the PyTorch form's tests above still run
needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"no compiled kernel here: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("ties", ["none", "fisher", "both"])
@pytest.mark.parametrize("tie_digits_16", [False, True])
@pytest.mark.parametrize("gather", [False, True])
def test_native_kernel_is_exact_on_every_path_and_thread_split(
        monkeypatch: pytest.MonkeyPatch, path: str, ties: str, tie_digits_16: bool, gather: bool) -> None:
    """Every path, with selections among the marked weights by histograms to the last digit or
    finished by copying out the few left (``_GATHER``)."""
    for name, value in PATHS[path].items():
        monkeypatch.setattr(native, name, value)
    monkeypatch.setattr(native, "_CANDIDATES_FOR_16_BITS", 0 if tie_digits_16 else 1 << 40)
    monkeypatch.setattr(native, "_GATHER", 1 << 40 if gather else -1)
    monkeypatch.setattr(native, "_MIN_SLICE", 65536)
    n = 3 * 65536 + 17  # three slices: ties split across threads
    w, f, mask = case(7, n, ties, torch.float32, 0.2)
    for k, rank in ((n // 3, n - n // 50), (n // 10, n // 2), (0, 1), (n, n), (1, None)):
        want = sort_reference(w, f, mask, k, rank, 0.1)
        w2, m2 = w.clone(), mask.clone()
        done = native.consolidate_(w2, f, m2, prune=k, strengthen_rank=rank, eta=0.1, threads=3)
        assert torch.equal(m2, want[1]) and torch.equal(w2, want[0]), (k, rank)
        assert (done.pruned, done.strengthened) == want[2:]


@needs_native
def test_a_sampled_bracket_holds_the_threshold_on_night_like_data() -> None:
    """The fast path is the usual one: on a large tensor the sample's brackets hold both ranks."""
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    w, f = torch.randn(n, generator=g) * 0.05, torch.rand(n, generator=g) ** 4
    f[torch.rand(n, generator=g) < 0.15] = 0.0
    mask = torch.rand(n, generator=g) >= 0.1
    w = w * mask
    live = int(mask.sum())
    keys = native.keys_of((f * w * w).numpy())
    pairs = (keys.astype(np.uint64) << np.uint64(32)) | (w.numpy().view(np.uint32) & np.uint32(0x7FFFFFFF))
    live_pairs = pairs[mask.numpy()]
    tied = int((live_pairs >> np.uint64(32) == keys_of_zero()).sum())  # the run of s = 0
    for k in (live // 10, live // 100, live // 2):  # in the run of s = 0, below it, above it
        lo_p, hi_p, lo_s, hi_s, _, _ = native._brackets(native._load(), w.data_ptr(), f.data_ptr(),
                                                        mask.data_ptr(), k, live, n - n // 100, n)
        assert int((live_pairs < lo_p).sum()) < k <= int((live_pairs <= hi_p).sum())
        assert int((keys < lo_s).sum()) < n - n // 100 <= int((keys <= hi_s).sum())
        if k == live // 10:  # |w| splits the run of ties already: the bracket marks a small part of it
            assert int(((live_pairs >= lo_p) & (live_pairs <= hi_p)).sum()) < tied / 4


@needs_native
def test_the_sample_is_the_keys_and_live_pairs_at_its_runs() -> None:
    """es_sample_keys: every sampled weight's key, and the live ones' (key, |w|) pairs in order."""
    w, f, mask = case(5, 200_000, "both", torch.float32, 0.3)
    w[::7] = -w[::7]  # |w| of negative weights too
    starts, run = native._sample_runs(w.numel())
    idx = (starts[:, None] + np.arange(run)).reshape(-1)
    keys = np.empty(idx.size, np.uint32)
    pairs = np.empty(idx.size, np.uint64)
    live = native._load().es_sample_keys(w.data_ptr(), f.data_ptr(), mask.data_ptr(), starts.ctypes.data,
                                         starts.size, run, keys.ctypes.data, pairs.ctypes.data)
    want = native.keys_of((f * w * w).numpy())[idx]
    alive = mask.numpy()[idx]
    mags = w.numpy().view(np.uint32)[idx] & np.uint32(0x7FFFFFFF)
    assert np.array_equal(keys, want) and live == int(alive.sum())
    assert np.array_equal(pairs[:live], (want[alive].astype(np.uint64) << np.uint64(32)) | mags[alive])


def keys_of_zero() -> int:
    return int(native.keys_of(np.zeros(1, np.float32))[0])


def test_native_kernel_takes_numpy_arrays_and_2d_tensors() -> None:
    w, f, mask = case(3, 4000, "fisher", torch.float32, 0.1)
    want = sort_reference(w, f, mask, 1000, 3900, 0.1)
    wn, fn, mn = w.numpy().copy(), f.numpy().copy(), mask.numpy().copy()
    done = consolidate_(wn, fn, mn, prune=1000, strengthen_rank=3900, eta=0.1)
    assert np.array_equal(wn, want[0].numpy()) and np.array_equal(mn, want[1].numpy())
    assert (done.pruned, done.strengthened) == want[2:]
    w2, m2 = w.reshape(40, 100).clone(), mask.reshape(40, 100).clone()  # any shape, flat index order
    consolidate_(w2, f.reshape(40, 100), m2, prune=1000, strengthen_rank=3900, eta=0.1)
    assert torch.equal(w2.reshape(-1), want[0]) and torch.equal(m2.reshape(-1), want[1])
    # float64 NumPy arrays take the PyTorch form, same answer
    w64 = w.double().numpy().copy()
    consolidate_(w64, f.double().numpy(), mask.numpy().copy(), prune=1000, strengthen_rank=3900, eta=0.1)
    assert np.array_equal(w64, sort_reference(w.double(), f.double(), mask, 1000, 3900, 0.1)[0].numpy())


def test_without_a_compiler_the_pytorch_form_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    w, f, mask = case(5, 5000, "both", torch.float32, 0.2)
    want = sort_reference(w, f, mask, 1500, 4900, 0.1)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", "EDGE_SLEEP_NATIVE=0")
    assert not native.available() and native.unavailable_reason() == "EDGE_SLEEP_NATIVE=0"
    w2, m2 = w.clone(), mask.clone()
    done = consolidate_(w2, f, m2, prune=1500, strengthen_rank=4900, eta=0.1)
    assert not done.native and torch.equal(w2, want[0]) and torch.equal(m2, want[1])
    with pytest.raises(NativeKernelError, match="not available"):
        native.consolidate_(w.clone(), f, mask.clone(), prune=1, strengthen_rank=None, eta=0.0)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    w, f, mask = case(1, 1000, "none", torch.float32, 0.1)
    bad_f = f.clone()
    bad_f[10] = float("nan")
    for fisher in (bad_f, bad_f.double()):
        w2, m2 = w.clone().to(fisher.dtype), mask.clone()
        with pytest.raises(InputError, match="NaN"):
            consolidate_(w2, fisher, m2, prune=100, strengthen_rank=900, eta=0.1)
        assert torch.equal(w2, w.to(fisher.dtype)) and torch.equal(m2, mask)
    with pytest.raises(InputError, match="one shape"):
        consolidate_(w.clone(), f[:10], mask.clone(), prune=1, strengthen_rank=None, eta=0.0)
    with pytest.raises(InputError, match="torch.bool"):
        consolidate_(w.clone(), f, mask.float(), prune=1, strengthen_rank=None, eta=0.0)
    with pytest.raises(InputError, match="one float dtype"):
        consolidate_(w.clone(), f.double(), mask.clone(), prune=1, strengthen_rank=None, eta=0.0)
    if native.available():
        with pytest.raises(InputError, match="contiguous"):
            native.consolidate_(w.clone().reshape(10, 100).t(), f.reshape(10, 100).t(),
                                mask.reshape(10, 100).t(), prune=1, strengthen_rank=None, eta=0.0)
        with pytest.raises(InputError, match="float32"):
            native.consolidate_(w.double(), f.double(), mask.clone(), prune=1, strengthen_rank=None, eta=0.0)


def test_native_kernel_bumps_autograd_versions() -> None:
    w = torch.nn.Parameter(torch.randn(100))
    before = w._version
    with torch.no_grad():  # like torch's in-place ops: a graph that saved w would refuse to backprop
        consolidate_(w, torch.rand(100), torch.ones(100, dtype=torch.bool), prune=10, strengthen_rank=None, eta=0.0)
    assert int((w == 0).sum()) == 10 and w._version > before


def test_order_keys_sort_like_the_floats_and_the_arithmetic_key_equals_the_bits() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x7F800001, size=200_000, dtype=np.int64).astype(np.uint32)
    edges = [0, 1, 0x007FFFFF, 0x00800000, 0x3F800000, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F800000]
    edges += [e << 23 for e in range(255)] + [(e << 23) | 0x7FFFFF for e in range(255)]
    x = torch.from_numpy(np.concatenate([bits, np.array(edges, np.uint32)]).view(np.float32).copy())
    assert torch.equal(order_key_nonneg(x), order_key(x))  # subnormals, powers of two and inf included
    for dtype in DTYPES:
        v = torch.cat([torch.randn(1000), torch.tensor([0.0, -0.0, float("inf"), -float("inf")])]).to(dtype)
        key = order_key(v)
        assert torch.equal(v[key.argsort(stable=True)].double().sort().values, v.double().sort().values)
        assert bool(((v[:, None] < v[None, :]) == (key[:, None] < key[None, :])).all())
