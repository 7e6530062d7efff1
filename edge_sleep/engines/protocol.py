"""The seam below the runtime: what an engine reads of a runtime, and what a runtime asks of an engine.

An engine runs a runtime's wake steps and predictions: eager PyTorch
(:class:`~edge_sleep.engines.torch_engine.TorchEngine`) or the exported ExecuTorch programs
(:class:`~edge_sleep.engines.executorch_engine.ExecuTorchEngine`). The runtime
(:class:`edge_sleep.EdgeSleep`) depends on these two protocols only; no engine imports the
runtime. Exports (:func:`edge_sleep.export.export_programs`) read a runtime through
:class:`Learner` too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from edge_sleep.config import SleepConfig, WakeConfig
from edge_sleep.store import ReplayBatch
from edge_sleep.wake import Anchor

__all__ = ["Learner", "Engine", "StepResult"]

#: ``(losses, latent, logits)`` of one wake step, as :func:`edge_sleep.wake.wake_step` returns it:
#: ``losses`` holds ``loss``, ``new_loss``, ``replay_loss``, ``penalty``, ``grad_norm`` and
#: ``skipped`` (``None`` or why the step was undone); latent and logits are detached.
StepResult = tuple[dict[str, Any], torch.Tensor, torch.Tensor]


@runtime_checkable
class Learner(Protocol):
    """What engines and exports read of a runtime (an :class:`edge_sleep.EdgeSleep` is one).

    Attributes:
        model: the model, adapters attached, as it computes now.
        wake_config: the day's settings (learning rate, clipping, replay weights, anchor).
        sleep_config: the night's settings (an export reads whether nights prune).
        anchor: the online Fisher anchor the wake step is penalised by.
        fingerprint: the model's architecture fingerprint (the store and the manifest carry it).
        num_classes: outputs of the model, ``None`` before the first batch.
        input_spec: ``(per-example shape, is_float)`` of the inputs, ``None`` before the first batch.
        prunable: names of the weight matrices a night prunes.
        masks: ``{weight name: bool keep-mask}`` of the weights a night has pruned.
        noise_layers: the modules whose outputs get the night's consolidation noise.
        base_parameters: ``{name: parameter}`` of the weights a night trains.
        encoder: stored record <- input (the identity when records are inputs).
        replay_head: logits <- stored record: what a night replays through.
    """

    model: nn.Module
    wake_config: WakeConfig
    sleep_config: SleepConfig
    anchor: Anchor
    fingerprint: str
    num_classes: int | None
    input_spec: tuple[tuple[int, ...], bool] | None
    prunable: list[str]
    masks: dict[str, torch.Tensor]
    noise_layers: list[str]

    @property
    def base_parameters(self) -> dict[str, nn.Parameter]: ...

    @property
    def encoder(self) -> nn.Module: ...

    @property
    def replay_head(self) -> nn.Module: ...

    def check_input(self, x: Any, name: str = "x") -> torch.Tensor:
        """``x`` checked against the inputs the runtime learned from (raises ``InputError``)."""
        ...

    def anchor_penalty(self, lr: float | None = None) -> torch.Tensor:
        """The anchor's penalty on the weights as they are (0 before the first night)."""
        ...


@runtime_checkable
class Engine(Protocol):
    """Runs a :class:`Learner`'s wake steps and predictions.

    The runtime calls, per ``learn``: :meth:`check_batch` (before the store's generator moves),
    :meth:`step`, and :meth:`undo_step` when the batch could not be stored afterwards; per
    ``logits``: :meth:`logits`; after it changed the weights itself (a night, a load):
    :meth:`weights_changed`. An engine never changes the runtime's state other than the
    trainable weights a step moves.
    """

    name: str

    def check_batch(self, learner: Learner, x: torch.Tensor) -> None:
        """Refuse (``InputError``) a checked batch this engine cannot take, before anything moves."""
        ...

    def step(self, learner: Learner, x: torch.Tensor, y: torch.Tensor, replay_logits: ReplayBatch | None,
             replay_labels: ReplayBatch | None) -> StepResult:
        """One guarded wake step: a step whose loss, gradient or weights go non-finite changes nothing."""
        ...

    def undo_step(self, learner: Learner) -> None:
        """Put the trainable weights back where the last :meth:`step` found them."""
        ...

    def weights_before_step(self, learner: Learner) -> AbstractContextManager[None]:
        """Inside: ``learner.model`` computes with the weights the last :meth:`step` found (what a
        private record's logits are computed with, so that they are post-processing of the noised
        latent and of weights that never saw the raw batch); after: the weights the step left."""
        ...

    def logits(self, learner: Learner, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Logits ``(B, C)`` of a checked batch in eval mode, ``batch_size`` examples a call at most."""
        ...

    def weights_changed(self) -> None:
        """The runtime changed the weights outside a step (a night, a load)."""
        ...
