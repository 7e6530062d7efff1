"""The wake step: the capped anchor, its decay, gradient clipping and the non-finite guard."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.adapters import lora_modules
from edge_sleep.wake import Anchor, effective_weights, wake_step
from tests.conftest import small_mlp


def test_a_penalty_only_step_at_the_cap_lands_on_the_reference() -> None:
    lr = 0.1
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    anchor = Anchor(decay=0.9)
    anchor.update_({"w": torch.tensor([1e6, 1e6, 1e6])}, {"w": torch.tensor([0.5, 0.5, 0.5])})
    opt = torch.optim.SGD([w], lr=lr)
    penalty = anchor.penalty({"w": w}, lam=10.0, lr=lr)  # lam * F = 1e7, far above the cap 1/(2 lr)
    opt.zero_grad()
    penalty.backward()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 0.5, 0.5]))


def test_below_the_cap_a_step_moves_part_of_the_way() -> None:
    lr, lam = 0.1, 1.0
    w = nn.Parameter(torch.tensor([1.0]))
    anchor = Anchor()
    anchor.update_({"w": torch.tensor([2.0])}, {"w": torch.tensor([0.0])})
    penalty = anchor.penalty({"w": w}, lam=lam, lr=lr)
    penalty.backward()
    # d/dw lam F (w - w*)^2 = 2 lam F (w - w*) = 4
    torch.testing.assert_close(w.grad, torch.tensor([4.0]))


def test_the_anchor_decays_old_fisher_and_moves_its_reference() -> None:
    anchor = Anchor(decay=0.5)
    anchor.update_({"w": torch.tensor([4.0])}, {"w": torch.tensor([1.0])})
    anchor.update_({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    torch.testing.assert_close(anchor.fisher["w"], torch.tensor([3.0]))  # 0.5 * 4 + 1
    torch.testing.assert_close(anchor.reference["w"], torch.tensor([2.0]))
    restored = Anchor()
    restored.load_state_dict(anchor.state_dict())
    assert restored.decay == 0.5 and torch.equal(restored.fisher["w"], anchor.fisher["w"])


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, **kw: object) -> dict[str, object]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, _, _ = wake_step(lambda v: (v, model(v)), model, opt, x, y, **kw)  # type: ignore[arg-type]
    return losses


def test_clipping_bounds_the_step() -> None:
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 8) * 50, torch.randint(0, 3, (16,))
    losses = _step(model, x, y, lr=0.1, max_grad_norm=0.5)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert losses["grad_norm"] > 0.5 and losses["skipped"] is None  # type: ignore[operator]
    assert float(moved) == pytest.approx(0.1 * 0.5, rel=1e-4)


def test_a_non_finite_loss_is_not_stepped() -> None:
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _step(model, torch.full((4, 8), float("nan")), torch.zeros(4, dtype=torch.long), lr=0.1)
    assert losses["skipped"] == "non-finite loss"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_whose_weights_overflow_is_undone() -> None:
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _step(model, torch.randn(4, 8), torch.zeros(4, dtype=torch.long), lr=1e38)
    assert losses["skipped"] == "non-finite weights"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_learn_undoes_a_diverging_step_stores_nothing_and_warns(tmp_path: Path) -> None:
    model = small_mlp()
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # so a finite input of 1e38 overflows the first layer, whatever the rest
    es = EdgeSleep(model, store=tmp_path / "r.db", wake=WakeConfig(train="all"))
    es.learn(torch.rand(8, 8), torch.randint(0, 3, (8,)))
    before = {k: v.clone() for k, v in es.model.state_dict().items()}
    n, steps = len(es.store), es.wake_steps_since_sleep
    with pytest.warns(RuntimeWarning, match="undid a wake step: non-finite"):
        stats = es.learn(torch.full((8, 8), 1e38), torch.zeros(8, dtype=torch.long))  # finite, but inf logits
    assert stats.skipped is not None and stats.stored == 0
    assert all(torch.equal(before[k], v) for k, v in es.model.state_dict().items())
    assert len(es.store) == n and es.wake_steps_since_sleep == steps and es.skipped_steps == 1


def test_default_adapters_survive_a_learning_rate_that_diverges_unclipped(tmp_path: Path) -> None:
    # the failure mode found on a rotated-MNIST stream: the bilinear LoRA update at lr 0.1 and
    # scale 2 feeds back on itself; the default clipping keeps it bounded
    def run(max_grad_norm: float | None) -> tuple[float, int]:
        torch.manual_seed(0)
        es = EdgeSleep(small_mlp(d_in=64, hidden=32), store=tmp_path / f"{max_grad_norm}.db",
                       wake=WakeConfig(lr=0.5, max_grad_norm=max_grad_norm))
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(60):
                x = torch.randn(32, 64, generator=g) * 4
                es.learn(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
        x = torch.randn(256, 64, generator=g) * 4
        acc = float((es.predict(x) == (x[:, 0] > 0).long() + (x[:, 1] > 0).long()).float().mean())
        return acc, es.skipped_steps

    unclipped_acc, unclipped_skips = run(None)
    clipped_acc, clipped_skips = run(1.0)
    assert unclipped_skips > 0  # it did diverge (and the guard caught it)
    assert clipped_skips == 0 and clipped_acc > 0.6


def test_effective_weights_fold_the_masked_adapter() -> None:
    model = small_mlp()
    es = EdgeSleep(model, sleep=SleepConfig(min_steps=5))
    lora = lora_modules(model)["0"]
    with torch.no_grad():
        lora.lora_b.normal_()
    mask = torch.rand_like(lora.weight) > 0.3
    lora.set_mask_(mask)
    eff = effective_weights(model, ["0.weight"])["0.weight"]
    expected = lora.weight + lora.scaling * (lora.lora_b @ lora.lora_a) * mask
    torch.testing.assert_close(eff, expected)
    x = torch.randn(5, 8)
    torch.testing.assert_close(lora(x), F.linear(x, expected, lora.bias))
    assert es.base_parameters.keys() == {n for n, _ in model.named_parameters() if "lora_" not in n}


def test_a_large_finite_fisher_counts_as_finite_and_an_inf_does_not() -> None:
    """Issue 21: a night aborted on 'non-finite Fisher' when every value was finite (the largest
    4.8e22): squaring such values in a norm overflows float32."""
    from edge_sleep.wake import all_finite, elements_finite

    big = [torch.full((3, 3), 4.8e22), torch.ones(2)]
    assert not all_finite(big)  # the norm overflows: weights this large are broken
    assert elements_finite(big)
    assert not elements_finite([torch.ones(2), torch.tensor([1.0, float("inf")])])
    assert not elements_finite([torch.tensor([float("nan")])])
    assert elements_finite([]) and elements_finite([torch.ones(3)])
