"""Dreams by recombination (issue 22, item 3): pairs of records blended, labels and targets alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edge_sleep import ConfigError, EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.mixup import mix_records


def _identity_batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Record i is the basis vector e_i, labelled i, with e_i as its stored logits: a blend of two
    records then equals its own soft label and its own target."""
    eye = torch.eye(n)
    return eye.clone(), torch.arange(n), eye.clone()


def test_dreams_blend_latents_labels_and_targets_with_one_weight() -> None:
    x, y, t = _identity_batch(8)
    mx, probs, mt = mix_records(x, y, t, 0.5, 8, torch.Generator().manual_seed(0))
    assert mt is not None
    torch.testing.assert_close(mx, probs)  # the weight on each class is the weight on its record
    torch.testing.assert_close(mt, probs)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    assert torch.equal(mx[4:], x[4:]) and torch.equal(probs[4:], torch.eye(8)[4:])  # half left as they were
    assert (mx[:4] != x[:4]).any()  # and half blended
    assert torch.equal(x, torch.eye(8)) and torch.equal(t, torch.eye(8))  # the inputs are not changed
    again = mix_records(x, y, t, 0.5, 8, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((mx, probs, mt), again))  # the generator decides


def test_no_dreams_is_the_batch_with_one_hot_labels() -> None:
    x, y, _ = _identity_batch(4)
    mx, probs, mt = mix_records(x, y, None, 0.0, 4, torch.Generator().manual_seed(0))
    assert mx is x and mt is None and torch.equal(probs, torch.eye(4))


def test_integer_records_and_bad_shares_are_refused() -> None:
    with pytest.raises(ConfigError, match="token ids"):
        mix_records(torch.randint(0, 9, (4, 3)), torch.arange(4), None, 0.5, 4, torch.Generator())
    with pytest.raises(ConfigError, match="dream_fraction"):
        SleepConfig(dream_fraction=1.5)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_a_night_with_dreams_learns_differently_and_repeats(tmp_path: Path) -> None:
    x, y = torch.rand(96, 6, generator=torch.Generator().manual_seed(1)), torch.arange(96) % 3

    def night(fraction: float, name: str) -> dict[str, torch.Tensor]:
        es = EdgeSleep(_mlp(), store=tmp_path / f"{name}.db", wake=WakeConfig(train="all", replay_batch=0),
                       sleep=SleepConfig(min_steps=20, fisher_steps=5, dream_fraction=fraction), seed=0)
        es.learn(x, y)
        report = es.sleep()
        assert report.completed and report.steps == 20 and report.aborted is None
        es.store.close()
        return {k: v.detach().clone() for k, v in es.model.state_dict().items()}

    plain, dreamt, dreamt_again = night(0.0, "a"), night(0.5, "b"), night(0.5, "c")
    assert any(not torch.equal(plain[k], dreamt[k]) for k in plain)
    assert all(torch.equal(dreamt[k], dreamt_again[k]) for k in plain)


def test_dreams_on_token_ids_are_refused_before_the_night_starts(tmp_path: Path) -> None:
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(x).mean(1))

    es = EdgeSleep(Embed(), store=tmp_path / "r.db", wake=WakeConfig(train="all", replay_batch=0),
                   sleep=SleepConfig(min_steps=5, dream_fraction=0.25))
    es.learn(torch.randint(0, 10, (4, 5)), torch.tensor([0, 1, 0, 1]))
    before = {k: v.clone() for k, v in es.model.state_dict().items()}
    with pytest.raises(ConfigError, match="token ids"):
        es.sleep()
    assert es.sleep_state is None and all(torch.equal(before[k], v) for k, v in es.model.state_dict().items())
    es.store.close()
