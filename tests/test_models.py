"""Model-agnostic smoke tests: learn and sleep on an MLP, a CNN and tiny HF transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.adapters import LoRALinear
from tests.conftest import small_mlp


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def hf(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=97, num_labels=3, pad_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **common)
        return transformers.GPT2ForSequenceClassification(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=32, **common)
        return transformers.LlamaForSequenceClassification(cfg)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=32, **common)
    return transformers.BertForSequenceClassification(cfg)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "mlp": (small_mlp, lambda n: torch.randn(n, 8)),
    "cnn": (cnn, lambda n: torch.randn(n, 1, 8, 8)),
    "gpt2": (lambda: hf("gpt2"), lambda n: torch.randint(1, 97, (n, 12))),
    "llama": (lambda: hf("llama"), lambda n: torch.randint(1, 97, (n, 12))),
    "bert": (lambda: hf("bert"), lambda n: torch.randint(1, 97, (n, 12))),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("train", ["adapters", "all"])
def test_learn_and_sleep(tmp_path: Path, name: str, train: str) -> None:
    build, data = CASES[name]
    model = build()
    es = EdgeSleep(model, store=tmp_path / "r.db", wake=WakeConfig(train=train, lr=0.05, replay_batch=4),
                   sleep=SleepConfig(min_steps=6, batch_size=4, fisher_steps=3, fisher_batch=4,
                                     fisher_chunk=2, check_every=2, prune_frac=0.05))
    if train == "adapters":
        assert any(isinstance(m, LoRALinear) for m in model.modules())
    for _ in range(3):
        stats = es.learn(data(4), torch.randint(0, 3, (4,)))
        assert torch.isfinite(torch.tensor(stats.loss))
    report = es.sleep()
    assert report.completed and report.steps == 6 and report.fisher_samples == 12
    assert report.pruned > 0 and es.anchor
    assert es.predict(data(5)).shape == (5,)
    es.learn(data(4), torch.randint(0, 3, (4,)))  # the anchored wake after a night
