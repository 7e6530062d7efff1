"""The Hugging Face ``Trainer`` with nights: :class:`EdgeSleepCallback`.

The ``Trainer`` trains by day as it always does (its optimizer, its schedule, its loss). The
callback makes that day an edge-sleep day:

- every training batch is offered to the runtime's replay store
  (:meth:`~edge_sleep.EdgeSleep.remember`, with the logits the training forward gave it);
- after the first night, the anchor's penalty is added to each step's gradients
  (:meth:`~edge_sleep.EdgeSleep.anchor_penalty`), so the day does not undo what the nights kept;
- a night runs at the end of each epoch and/or every ``sleep_every`` optimizer steps; it stops
  early when the Trainer is told to stop while it runs (``control.should_training_stop``) or
  ``should_stop`` says so, and the next night resumes it.

Example::

    es = EdgeSleep(PadMasked(model, tokenizer.pad_token_id), wake=WakeConfig(train="adapters"))
    trainer = Trainer(model=es.model, args=args, train_dataset=day_one,
                      callbacks=[EdgeSleepCallback(es, stream="tweets")])
    trainer.train()

The night replays the store through ``es.model(input_ids)``, one tensor: pad the batches to one
length (the store keeps records of one shape) and wrap a model that needs an attention mask in
:class:`PadMasked`, so the night sees the mask the day saw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from edge_sleep.errors import ConfigError, InputError
from edge_sleep.runtime import EdgeSleep
from edge_sleep.sleep import SleepReport

__all__ = ["EdgeSleepCallback", "PadMasked"]


class PadMasked(nn.Module):
    """A Hugging Face model called with token ids alone, the attention mask made from the pad id.

    ``forward(input_ids, attention_mask=None, labels=None, **kwargs)`` passes ``attention_mask = input_ids !=
    pad_token_id`` when none is given, and everything else (``labels``...) through, so the
    ``Trainer``'s calls and the night's ``model(input_ids)`` compute the same thing.
    """

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ConfigError("PadMasked", [f"pad_token_id={pad_token_id!r}; expected a token id >= 0 "
                                            "(tokenizer.pad_token_id)"])
        self.model = model
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # labels is named so the Trainer (which reads this signature) keeps it in the batch
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class EdgeSleepCallback(TrainerCallback):
    """A ``TrainerCallback`` that gives a ``Trainer``'s training days replay, an anchor and nights.

    Args:
        runtime: the :class:`~edge_sleep.EdgeSleep` whose ``model`` the ``Trainer`` trains.
        sleep_every: also run a night every this many optimizer steps (``None``: only at epoch ends).
        sleep_at_epoch_end: run a night at the end of each epoch.
        stream: the tag the stored records carry (the domain, the user...).
        input_key: the batch's key of the inputs the store keeps (token ids).
        label_key: the batch's key of the labels.
        anchor: add the anchor's penalty to each step's gradients after the first night.
        should_stop: asked during a night, with the Trainer's stop signal; ``True`` ends the night
            early (the next night resumes it).
        progress: passed to :meth:`~edge_sleep.EdgeSleep.sleep` (for instance ``tqdm.update``).

    Attributes:
        reports: the :class:`~edge_sleep.sleep.SleepReport` of each night, in order.
        stored: how many records the store kept from the training batches.
    """

    def __init__(self, runtime: EdgeSleep, *, sleep_every: int | None = None, sleep_at_epoch_end: bool = True,
                 stream: str = "", input_key: str = "input_ids", label_key: str = "labels", anchor: bool = True,
                 should_stop: Callable[[], bool] | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        problems = []
        if not isinstance(runtime, EdgeSleep):
            problems.append(f"runtime is a {type(runtime).__name__}; expected an EdgeSleep")
        if sleep_every is not None and (not isinstance(sleep_every, int) or sleep_every < 1):
            problems.append(f"sleep_every={sleep_every!r}; expected a step count >= 1 or None")
        if problems:
            raise ConfigError("EdgeSleepCallback", problems)
        self.runtime = runtime
        self.sleep_every = sleep_every
        self.sleep_at_epoch_end = sleep_at_epoch_end
        self.stream = stream
        self.input_key = input_key
        self.label_key = label_key
        self.anchor = anchor
        self.should_stop = should_stop
        self.progress = progress
        self.reports: list[SleepReport] = []
        self.stored = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._hook: Any = None
        self._asleep = False

    # -------------------------------------------------------------- the batches
    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._asleep or not module.training or not torch.is_grad_enabled():
            return  # the night's own forward passes, or evaluation
        x = kwargs.get(self.input_key, args[0] if args else None)
        y = kwargs.get(self.label_key)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise InputError(f"the Trainer's batch has no tensors under {self.input_key!r} and {self.label_key!r} "
                             f"(keys: {sorted(kwargs)}); expected the inputs and the labels the store keeps. "
                             "Fix: EdgeSleepCallback(input_key=..., label_key=...) naming them.")
        logits = getattr(output, "logits", output if isinstance(output, torch.Tensor) else None)
        self._pending.append((x.detach(), y.detach(), None if logits is None else logits.detach()))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and model is not self.runtime.model:
            raise ConfigError("EdgeSleepCallback", [f"the Trainer trains a {type(model).__name__} that is not "
                                                    "runtime.model; expected the runtime's own model. Fix: "
                                                    "Trainer(model=es.model, ...)"])
        if self._hook is None:
            self._hook = self.runtime.model.register_forward_hook(self._capture, with_kwargs=True)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._flush()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for x, y, logits in pending:
            self.stored += self.runtime.remember(x, y, stream=self.stream, logits=logits)

    # ------------------------------------------------------------------ the day
    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        if not self.anchor:
            return
        penalty = self.runtime.anchor_penalty(lr=args.learning_rate)
        if penalty.requires_grad:  # zero (and constant) before the first night
            penalty.backward()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._flush()
        if self.sleep_every is not None and state.global_step % self.sleep_every == 0:
            self._sleep(control, kwargs.get("optimizer"))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._flush()
        if self.sleep_at_epoch_end:
            self._sleep(control, kwargs.get("optimizer"))

    # ---------------------------------------------------------------- the night
    def _sleep(self, control: TrainerControl, optimizer: Any) -> None:
        if len(self.runtime.store) == 0 and self.runtime.sleep_state is None:
            return  # nothing to replay yet

        # the Trainer also raises should_training_stop on its last step, before the last epoch's
        # night: only a signal raised while the night runs (another thread, a handler) stops it
        already = bool(control.should_training_stop)

        def stop() -> bool:
            return (not already and bool(control.should_training_stop)) or (
                self.should_stop is not None and self.should_stop())

        self._asleep = True
        try:
            report = self.runtime.sleep(should_stop=stop, progress=self.progress)
        finally:
            self._asleep = False
        self.reports.append(report)
        if optimizer is not None:
            # the night merged the adapters into the base and started them afresh: the optimizer's
            # moments belong to the adapters that were
            trained = {id(p) for p in self.runtime.model.parameters() if p.requires_grad}
            for p in [p for p in optimizer.state if id(p) in trained]:
                del optimizer.state[p]
