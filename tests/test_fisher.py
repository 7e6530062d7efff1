from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_sleep.fisher import fisher_sums, fisher_sums_loop, split_groups
from tests.conftest import small_mlp


def loss_fn(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    loss = F.cross_entropy(logits, y)
    return loss if t is None else loss + 0.3 * F.mse_loss(logits, t)


def test_chunked_equals_unchunked_equals_loop() -> None:
    model = small_mlp()
    x, y, t = torch.randn(37, 8), torch.randint(0, 3, (37,)), torch.randn(37, 3)
    names = [n for n, _ in model.named_parameters()]
    whole = fisher_sums(model, names, x, y, t, loss_fn, chunk=1000, groups=1)
    chunked = fisher_sums(model, names, x, y, t, loss_fn, chunk=5, groups=3)
    loop = fisher_sums_loop(model, names, x, y, t, loss_fn)
    for n in names:
        assert whole[n].abs().sum() > 0
        torch.testing.assert_close(chunked[n], whole[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(loop[n], whole[n], rtol=1e-5, atol=1e-7)


def test_fisher_is_not_squared_batch_gradient() -> None:
    model = small_mlp()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    names = ["0.weight"]
    per_sample = fisher_sums(model, names, x, y, None, loss_fn)["0.weight"] / 16
    g = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight])[0]
    assert not torch.allclose(per_sample, g.pow(2))


def test_split_groups_covers_all_names_once() -> None:
    names = [f"p{i}" for i in range(7)]
    groups = split_groups(names, [10, 1, 1, 50, 3, 3, 3], 3)
    assert sorted(sum(groups, [])) == sorted(names) and 1 <= len(groups) <= 3
