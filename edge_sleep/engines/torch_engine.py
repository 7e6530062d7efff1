"""The torch engine: wake steps and predictions in eager PyTorch (any ``nn.Module``, any device)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from edge_sleep.engines.protocol import Learner, StepResult
from edge_sleep.store import ReplayBatch
from edge_sleep.wake import wake_step

__all__ = ["TorchEngine", "eval_logits"]


@torch.no_grad()
def eval_logits(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                batch_size: int) -> torch.Tensor:
    """``forward`` over ``x`` in chunks of ``batch_size``, with ``model`` in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([forward(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was_training)


class TorchEngine:
    """Eager wake steps (:func:`edge_sleep.wake.wake_step`) with plain SGD over ``params``.

    Args:
        params: the trainable parameters (the adapters, or every weight).
        lr: SGD's learning rate.
        forward: ``x -> (latent, logits)`` on new inputs.
        replay_forward: ``latent -> logits`` on stored latents.
    """

    name = "torch"

    def __init__(self, params: list[nn.Parameter], lr: float,
                 forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 replay_forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.optimizer = torch.optim.SGD(params, lr=lr)
        self.forward = forward
        self.replay_forward = replay_forward
        self._before: tuple[list[torch.Tensor], dict[str, Any] | None] | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def check_batch(self, learner: Learner, x: torch.Tensor) -> None:
        """Every checked batch is fine here."""

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, replay_logits: ReplayBatch | None,
             replay_labels: ReplayBatch | None) -> StepResult:
        cfg = learner.wake_config
        penalty_fn = learner.anchor_penalty if learner.anchor and cfg.anchor_lambda > 0 else None
        self._before = ([p.detach().clone() for p in self.params],
                        copy.deepcopy(self.optimizer.state_dict()) if self.optimizer.state else None)
        return wake_step(self.forward, self.replay_forward, self.optimizer, x, y,
                         replay_logits=replay_logits, replay_labels=replay_labels, alpha=cfg.replay_alpha,
                         beta=cfg.replay_beta, penalty_fn=penalty_fn, max_grad_norm=cfg.max_grad_norm)

    @torch.no_grad()
    def undo_step(self, learner: Learner) -> None:
        if self._before is None:
            return
        weights, optimizer = self._before
        for p, b in zip(self.params, weights):
            p.copy_(b)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)
        self._before = None

    @contextlib.contextmanager
    def weights_before_step(self, learner: Learner) -> Iterator[None]:
        if self._before is None:
            yield
            return
        with torch.no_grad():
            after = [p.detach().clone() for p in self.params]
            for p, b in zip(self.params, self._before[0]):
                p.copy_(b)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, a in zip(self.params, after):
                    p.copy_(a)

    def logits(self, learner: Learner, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        return eval_logits(learner.model, lambda part: self.forward(part)[1], x, batch_size)

    def weights_changed(self) -> None:
        """Nothing to rebuild: eager torch computes with the weights as they are."""
