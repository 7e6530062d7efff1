from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sleep.fisher import fisher_sums, fisher_sums_loop, fisher_sums_streamed, split_groups
from tests.conftest import small_mlp


def loss_fn(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    loss = F.cross_entropy(logits, y)
    return loss if t is None else loss + 0.3 * F.mse_loss(logits, t)


def explicit_fisher_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         t: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Written out by hand: one forward/backward per sample, gradients squared and summed."""
    out: dict[str, torch.Tensor] = {}
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1], None if t is None else t[i:i + 1]).backward()
        for n, p in model.named_parameters():
            out[n] = out.get(n, torch.zeros_like(p)) + p.grad.detach() ** 2
    return out


@pytest.mark.parametrize(("chunk", "groups"), [(1000, 1), (5, 3), (7, 2), (1, 40)])
def test_chunked_equals_unchunked_equals_a_hand_written_loop(chunk: int, groups: int) -> None:
    model = small_mlp()
    x, y, t = torch.randn(37, 8), torch.randint(0, 3, (37,)), torch.randn(37, 3)
    names = [n for n, _ in model.named_parameters()]
    got = fisher_sums(model, names, x, y, t, loss_fn, chunk=chunk, groups=groups)
    loop = fisher_sums_loop(model, names, x, y, t, loss_fn)
    streamed = fisher_sums_streamed(model, names, x, y, t, loss_fn)
    kept = fisher_sums_streamed(model, names, x, y, t, loss_fn, release_memory=False)
    hand = explicit_fisher_sums(model, x, y, t)
    for n in names:
        assert hand[n].abs().sum() > 0  # an all-zero Fisher cannot pass
        torch.testing.assert_close(got[n], hand[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loop[n], hand[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(streamed[n], hand[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(kept[n], streamed[n])  # returning free pages changes no value


def test_streamed_fisher_holds_one_gradient_at_a_time_and_leaves_the_model_as_it_was() -> None:
    model = small_mlp()
    x, y = torch.randn(9, 8), torch.randint(0, 3, (9,))
    names = ["0.weight", "2.bias"]  # a subset: the others get no gradient during the call
    model[0].bias.requires_grad_(False)
    earlier = torch.ones_like(model[2].weight)
    model[2].weight.grad = earlier
    seen: list[int] = []
    live = {n: p for n, p in model.named_parameters()}

    def count(_: torch.Tensor) -> None:  # after each gradient: how many .grad tensors exist
        seen.append(sum(p.grad is not None for p in live.values()))

    hooks = [p.register_post_accumulate_grad_hook(count) for n, p in live.items() if n in names]
    got = fisher_sums_streamed(model, names, x, y, None, loss_fn)
    for h in hooks:
        h.remove()
    want = fisher_sums_loop(model, names, x, y, None, loss_fn)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    assert seen and max(seen) <= 1  # never more than the gradient just produced
    assert model[2].weight.grad is earlier and model[0].weight.grad is None
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    buffer = {n: torch.zeros_like(live[n]) for n in names}  # accumulates into a caller's buffer
    out = fisher_sums_streamed(model, names, x, y, None, loss_fn, sums=buffer)
    assert out is buffer and torch.allclose(buffer["0.weight"], want["0.weight"], rtol=1e-5, atol=1e-7)


def test_per_sample_fisher_exceeds_the_squared_mean_gradient() -> None:
    # mean_i g_i^2 >= (mean_i g_i)^2 elementwise (Jensen), strictly where samples disagree: the
    # estimate is per-sample, not a squared batch gradient
    model = small_mlp()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    per_sample = fisher_sums(model, ["0.weight"], x, y, None, loss_fn)["0.weight"] / 16
    g = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight])[0]
    assert torch.all(per_sample >= g.pow(2) - 1e-7)
    assert (per_sample - g.pow(2)).sum() > 0.1 * per_sample.sum() > 0


def test_split_groups_balances_the_p_mnist_mlp_by_parameter_count() -> None:
    shapes = [(100, 784), (100,), (100, 100), (100,), (10, 100), (10,)]
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    groups = split_groups(names, shapes, 2)
    row = {n: math.prod(s[1:]) for n, s in zip(names, shapes)}
    counts = [sum((b - a) * row[n] for n, a, b in g) for g in groups]
    assert counts == [44688, 44922]  # not 78,400 + 11,210


@settings(max_examples=80, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=8),
       groups=st.integers(1, 12))
def test_split_groups_covers_every_row_once_and_balances(shapes: list[list[int]], groups: int) -> None:
    names = [f"p{i}" for i in range(len(shapes))]
    out = split_groups(names, [tuple(s) for s in shapes], groups)
    assert 1 <= len(out) <= groups
    for name, shape in zip(names, shapes):
        rows = shape[0] if shape else 1
        pieces = sorted((a, b) for g in out for n, a, b in g if n == name)
        covered = [r for a, b in pieces for r in range(a, b)]
        assert covered == list(range(rows)) or (rows == 0 and pieces == [(0, 0)])
    sizes = [math.prod(s) for s in shapes]
    row_size = {n: (math.prod(s[1:]) if s else 1) for n, s in zip(names, shapes)}
    counts = [sum((b - a) * row_size[n] for n, a, b in g) for g in out]
    biggest_row = max(row_size.values())
    assert max(counts) <= sum(sizes) / groups + biggest_row


def test_fisher_of_a_parameter_subset_and_a_scalar() -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_mlp()
            self.temperature = torch.nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) * self.temperature

    model = Scaled()
    x, y = torch.randn(9, 8), torch.randint(0, 3, (9,))
    names = ["temperature", "body.2.weight"]
    got = fisher_sums(model, names, x, y, None, loss_fn, chunk=4, groups=2)
    loop = fisher_sums_loop(model, names, x, y, None, loss_fn)
    assert set(got) == set(names) and got["temperature"].shape == ()
    for n in names:
        torch.testing.assert_close(got[n], loop[n], rtol=1e-5, atol=1e-7)


def test_release_free_memory_returns_freed_heap_pages_on_glibc() -> None:
    import platform

    from edge_sleep.memory import release_free_memory, resident_bytes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or resident_bytes() is None:
        assert release_free_memory() in (True, False)
        return
    # many small tensors (below the allocator's mmap threshold: they live on the heap), freed
    # all but one at the end so the heap cannot shrink from its top by itself
    blocks = [torch.ones(16_000) for _ in range(3000)]  # 64 KB each, about 190 MB
    keep = blocks[-1]
    del blocks
    before = resident_bytes()
    assert release_free_memory() is True
    after = resident_bytes()
    assert before is not None and after is not None and before - after > 100 * 2**20
    del keep
