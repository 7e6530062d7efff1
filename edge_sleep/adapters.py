"""LoRA adapters on ``nn.Linear`` and Hugging Face's GPT-2 ``Conv1D``, with a frozen base.

The adapted layer computes ``y = base(x) + (alpha / r) * F.linear(F.linear(x, A), B)`` with
``A: (r, in)`` and ``B: (out, r)``; ``B`` starts at zero so attaching changes nothing. The LoRA
path is written as two ``F.linear`` calls so ExecuTorch's XNNPACK partitioner delegates the
whole model as one partition (facts.md).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> before = model(torch.ones(1, 4))
    >>> _ = attach_lora(model, rank=2)
    >>> torch.allclose(model(torch.ones(1, 4)), before)
    True
    >>> [n for n, p in model.named_parameters() if p.requires_grad]
    ['0.lora_a', '0.lora_b']
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "attach_lora", "merge_lora_", "reset_lora_", "lora_modules", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (a linear layer with weight ``(in, out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LoRALinear(nn.Module):
    """A linear layer (``nn.Linear`` or HF ``Conv1D``) with a trainable low-rank update.

    Args:
        base: the layer to adapt; its parameters are frozen and kept as ``weight``/``bias``
            in ``(out, in)`` layout.
        rank: adapter rank ``r``.
        alpha: scale numerator; the update is ``(alpha / r) * B @ A``.

    Shapes:
        input ``(*, in)`` -> output ``(*, out)``.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        # True for a GPT-2 Conv1D, whose weight the model's own files keep as (in, out)
        self.fan_in_fan_out = is_conv1d(base)
        if isinstance(base, nn.Linear):
            weight = base.weight.detach()
        elif self.fan_in_fan_out:
            conv_weight: torch.Tensor = base.weight  # type: ignore[assignment]
            weight = conv_weight.detach().t()  # Conv1D stores (in, out)
        else:
            raise TypeError(f"LoRALinear adapts nn.Linear or HF Conv1D, got {type(base).__name__}")
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=False)
        bias = getattr(base, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_f, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank, dtype=weight.dtype))
        # keep-mask of pruned weights (None: nothing pruned); not saved with the module, the
        # runtime owns the masks and sets them here with set_mask_
        self.weight_mask: torch.Tensor | None
        self.register_buffer("weight_mask", None, persistent=False)
        reset_lora_(self)

    def delta_weight(self) -> torch.Tensor:
        """The adapter's update ``s * B @ A`` ``(out, in)``, zero where the mask prunes."""
        delta = self.scaling * (self.lora_b @ self.lora_a)
        return delta if self.weight_mask is None else delta * self.weight_mask

    def effective_weight(self) -> torch.Tensor:
        """``W + s * B @ A`` (masked): the weight the layer computes with; differentiable in A, B."""
        return self.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_mask is not None:
            # a pruned weight stays zero in the effective weight: the masked update is
            # materialised, (out, in) per call, only in layers that have pruned weights
            return F.linear(x, self.effective_weight(), self.bias)
        base = F.linear(x, self.weight, self.bias)
        return base + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    @torch.no_grad()
    def set_mask_(self, mask: torch.Tensor | None) -> None:
        """Keep only the weights where ``mask`` is ``True`` (bool ``(out, in)``), also in the update."""
        if mask is not None and mask.shape != self.weight.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(self.weight.shape)}")
        self.weight_mask = None if mask is None else mask.to(device=self.weight.device, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{name: module}`` of every adapted layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def attach_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0) -> list[str]:
    """Replace every ``nn.Linear``/``Conv1D`` with a :class:`LoRALinear`; freeze everything else.

    Returns:
        The names of the adapted layers. Only ``lora_a``/``lora_b`` stay trainable.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, rank, alpha).to(next(base.parameters()).device))
    return targets


@torch.no_grad()
def reset_lora_(module: LoRALinear) -> None:
    """Fresh adapter: ``A`` Kaiming-uniform, ``B`` zero (the layer equals its base)."""
    nn.init.kaiming_uniform_(module.lora_a, a=math.sqrt(5))
    module.lora_b.zero_()


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += s * B @ A``, masked) and reset the adapter.

    A layer whose ``B`` is zero has nothing to merge and is left exactly as it is, so merging
    twice in a row (a night resumed with no learning in between) changes nothing.

    Returns:
        How many layers were merged. The model computes the same function before and after.
    """
    merged = 0
    for m in lora_modules(model).values():
        if not bool(m.lora_b.any()):
            continue
        m.weight.add_(m.delta_weight())
        reset_lora_(m)
        merged += 1
    return merged
