"""The day: one wake step, and the Fisher anchor that protects consolidated weights.

A wake step minimises, on a new batch ``(x, y)`` and optionally two batches replayed from the store,

    CE(f(x), y) + alpha * MSE(f(x_r1), z_r1) + beta * CE(f(x_r2), y_r2) + penalty

where ``z`` are the logits stored with each record (DER++, Buzzega et al. 2020) and ``penalty`` is
the online-EWC anchor ``sum_i min(lambda F_i, 1 / (2 lr)) (w_i - w*_i)^2``. The cap keeps an SGD
step from overshooting the anchor however large ``F`` gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_sleep.adapters import LoRALinear
from edge_sleep.errors import check_format_version
from edge_sleep.store import ReplayBatch

__all__ = ["Anchor", "WakeStats", "wake_step", "effective_weights", "all_finite", "elements_finite",
           "ANCHOR_FORMAT_VERSION"]

ANCHOR_FORMAT_VERSION = 1


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor is finite, checked with one fused norm.

    Values beyond about 1e19 overflow the norm and count as non-finite too: weights or gradients
    that large are broken anyway. Sums that may legitimately be that large (a Fisher of raw
    0-255 inputs reaches 1e22) are checked with :func:`elements_finite`.
    """
    return not tensors or math.isfinite(float(torch.nn.utils.get_total_norm(tensors)))


def elements_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor is finite, however large: the fused norm answers when it
    does not overflow, and only then are the elements checked one by one."""
    return all_finite(tensors) or all(bool(torch.isfinite(t).all()) for t in tensors)


def effective_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the weights the model computes with, adapters folded in.

    For a :class:`LoRALinear` the effective ``weight`` is ``W + s * B @ A`` (masked where pruned,
    differentiable in the adapter), so the anchor also protects against moves made through
    adapters, and the anchor's reference is taken on the same quantity.
    """
    params = dict(model.named_parameters())
    lora = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for n in names:
        m = lora.get(n)
        out[n] = params[n] if m is None else m.effective_weight()
    return out


class Anchor:
    """Online EWC state: a decayed sum of Fisher diagonals and the weights it was taken at.

    Args:
        decay: ``gamma`` in ``F_anchor <- gamma * F_anchor + F``.
    """

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.fisher: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.fisher)

    @torch.no_grad()
    def update_(self, fisher: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        """Fold tonight's Fisher into the anchor and move the reference to ``weights``."""
        for n, f in fisher.items():
            prev = self.fisher.get(n)
            self.fisher[n] = f.detach().clone() if prev is None else self.decay * prev + f.detach()
            self.reference[n] = weights[n].detach().clone()

    def penalty(self, weights: dict[str, torch.Tensor], lam: float, lr: float) -> torch.Tensor:
        """``sum min(lam * F, 1/(2 lr)) * (w - w*)^2`` over the anchored weights."""
        total = torch.zeros((), device=next((f.device for f in self.fisher.values()), None))
        cap = 1.0 / (2.0 * lr)
        for n, f in self.fisher.items():
            total = total + ((lam * f).clamp(max=cap) * (weights[n] - self.reference[n]).pow(2)).sum()
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": ANCHOR_FORMAT_VERSION, "decay": self.decay,
                "fisher": dict(self.fisher), "reference": dict(self.reference)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; refuses a newer format version."""
        check_format_version("Anchor state", state.get("format_version"), ANCHOR_FORMAT_VERSION)
        self.decay = float(state["decay"])
        self.fisher = dict(state["fisher"])
        self.reference = dict(state["reference"])


@dataclass(frozen=True)
class WakeStats:
    """What one ``learn`` call did.

    Attributes:
        loss: the total loss minimised.
        new_loss: cross-entropy on the new batch.
        replay_loss: the replay terms (0 without replay).
        penalty: the anchor penalty (0 without an anchor).
        batch: examples in the new batch.
        stored: how many of them the store kept.
        grad_norm: the gradient's L2 norm before clipping (``nan`` when the loss was not finite).
        replayed: stored records replayed in this step (both replay terms together).
        skipped: ``None`` when the step was taken; otherwise why it was undone (``"non-finite
            loss"``, ``"non-finite gradient"`` or ``"non-finite weights"``). A skipped step
            changes no weight and stores nothing.
        slots: per example of the batch, the store slot it now occupies, or -1 where it was
            not kept (:meth:`edge_sleep.store.ReplayStore.offer`); empty when nothing was offered.
    """

    loss: float
    new_loss: float
    replay_loss: float
    penalty: float
    batch: int
    stored: int
    grad_norm: float = 0.0
    replayed: int = 0
    skipped: str | None = None
    slots: tuple[int, ...] = ()


def wake_step(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    replay_forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    replay_logits: ReplayBatch | None = None,
    replay_labels: ReplayBatch | None = None,
    alpha: float = 0.0,
    beta: float = 0.0,
    penalty_fn: Callable[[], torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """One guarded optimizer step on a new batch plus replay; see the module docstring for the loss.

    The step is undone (never kept) when the loss, the gradient or the updated weights are not
    finite; ``losses["skipped"]`` then says which.

    Args:
        forward: ``x -> (latent, logits)`` on new inputs.
        replay_forward: ``latent -> logits`` on stored latents.
        optimizer: steps the trainable parameters.
        x: new inputs ``(B, ...)``; y: labels ``(B,)``.
        replay_logits: records for the distillation term (weight ``alpha``).
        replay_labels: records for the label term (weight ``beta``).
        penalty_fn: returns the anchor penalty, or ``None``.
        max_grad_norm: clip the gradient's global L2 norm to this (``None``: no clipping).

    Returns:
        ``(losses, latent, logits)``; latent and logits are detached, computed before the step.
        ``losses`` holds ``loss``, ``new_loss``, ``replay_loss``, ``penalty``, ``grad_norm`` and
        ``skipped`` (``None`` or the reason).
    """
    latent, logits = forward(x)
    new_loss = F.cross_entropy(logits, y)
    replay = torch.zeros((), device=new_loss.device)
    if replay_logits is not None and replay_logits.logits is not None and alpha > 0:
        replay = replay + alpha * F.mse_loss(replay_forward(replay_logits.x), replay_logits.logits)
    if replay_labels is not None and beta > 0:
        replay = replay + beta * F.cross_entropy(replay_forward(replay_labels.x), replay_labels.y)
    penalty = penalty_fn() if penalty_fn is not None else torch.zeros((), device=new_loss.device)
    loss = new_loss + replay + penalty
    losses: dict[str, Any] = {"loss": loss.item(), "new_loss": new_loss.item(),
                              "replay_loss": replay.item(), "penalty": penalty.item(),
                              "grad_norm": float("nan"), "skipped": None}
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not math.isfinite(losses["loss"]):
        losses["skipped"] = "non-finite loss"
        return losses, latent.detach(), logits.detach()
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    losses["grad_norm"] = float(norm)
    if not math.isfinite(losses["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        losses["skipped"] = "non-finite gradient"
        return losses, latent.detach(), logits.detach()
    before = [p.detach().clone() for p in params] if grads else []
    optimizer.step()
    if grads and not all_finite(params):
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        losses["skipped"] = "non-finite weights"
    return losses, latent.detach(), logits.detach()
