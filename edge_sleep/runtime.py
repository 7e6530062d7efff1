"""``EdgeSleep``: the facade an app talks to (learn by day, sleep by night, save, load)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from edge_sleep.adapters import LoRALinear, attach_lora, is_conv1d, lora_modules, merge_lora_
from edge_sleep.atomic import atomic_directory, previous_of
from edge_sleep.config import PrivacyConfig, SleepConfig, StoreConfig, WakeConfig, config_from_dict
from edge_sleep.engines import Engine, TorchEngine
from edge_sleep.errors import (
    CallOrderError,
    CheckpointError,
    ConfigError,
    EdgeSleepError,
    InputError,
    check_format_version,
    first_line,
)
from edge_sleep.integrations.peft import adopt_peft_, peft_lora_layers, peft_problems, save_adapters, save_base
from edge_sleep.modelio import activation_module_names, logits_of, model_fingerprint, split_sequential
from edge_sleep.mixup import check_blendable
from edge_sleep.dreams import StatsAccumulator, release_dreams
from edge_sleep.privacy import delta_problem, privatize
from edge_sleep.sleep import Night, SleepReport, SleepState, apply_masks_, run_sleep
from edge_sleep.store import STORE_FORMAT_VERSION, ReplayStore
from edge_sleep.wake import ANCHOR_FORMAT_VERSION, Anchor, WakeStats, effective_weights

_F = TypeVar("_F", bound=Callable[..., Any])


def _serialized(method: _F) -> _F:
    """One call at a time per runtime: apps call it from UI threads and background workers."""
    @functools.wraps(method)
    def wrapper(self: EdgeSleep, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]

__all__ = ["EdgeSleep", "RUNTIME_FORMAT_VERSION"]

RUNTIME_FORMAT_VERSION = 1
_PRUNABLE = (nn.Linear, LoRALinear, nn.Conv1d, nn.Conv2d)


class EdgeSleep:
    """A model that learns during the day and consolidates during the night.

    Args:
        model: any ``nn.Module`` whose forward maps a batch to logits ``(B, C)`` (or a Hugging
            Face output with ``.logits``).
        store: a :class:`ReplayStore`, a path for a new/existing one, or ``None`` for an
            in-memory store (lost on exit).
        store_config: settings of a store created from a path.
        wake: day-time settings.
        sleep: night-time settings.
        seed: seeds the store's and the noise's generators (same seed, same result).
        engine: ``"torch"`` (eager) or ``"executorch"``: wake steps through the exported
            ``train.pte`` and predictions through ``infer.pte``
            (:mod:`edge_sleep.engines.executorch_engine`); needs ``WakeConfig(train="adapters")``
            and no ``latent_layer``. The night runs on torch.
        privacy: per-record differential privacy of what the store keeps
            (:class:`~edge_sleep.config.PrivacyConfig`); ``store.privacy_report()`` states it.
        store_key: encrypt the store at rest with this AES key (16, 24 or 32 bytes, from the
            platform keystore); never saved by :meth:`save`, so pass it to :meth:`load` too.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from edge_sleep import EdgeSleep, WakeConfig, SleepConfig
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> es = EdgeSleep(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                wake=WakeConfig(train="all"), sleep=SleepConfig(min_steps=5))
        >>> stats = es.learn(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        >>> report = es.sleep()
        >>> report.completed, es.predict(torch.randn(3, 4)).shape
        (True, torch.Size([3]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        store: ReplayStore | str | Path | None = None,
        store_config: StoreConfig | None = None,
        wake: WakeConfig | None = None,
        sleep: SleepConfig | None = None,
        seed: int = 0,
        engine: str = "torch",
        privacy: PrivacyConfig | None = None,
        store_key: bytes | None = None,
    ) -> None:
        if privacy is not None and not isinstance(privacy, PrivacyConfig):
            raise ConfigError("EdgeSleep", [f"privacy is a {type(privacy).__name__}; expected a PrivacyConfig or None"])
        if engine not in ("torch", "executorch"):
            raise ConfigError("EdgeSleep", [f"engine={engine!r}; expected 'torch' or 'executorch'"])
        wake, sleep = wake or WakeConfig(), sleep or SleepConfig()
        cap = None if store_config is None else store_config.capacity_records
        if privacy is not None and privacy.epsilon is not None and cap is not None and privacy.delta * cap >= 1:
            raise ConfigError("EdgeSleep", [delta_problem(privacy.delta, cap)])
        if engine == "executorch":
            problems = []
            if wake.train != "adapters":
                problems.append("engine='executorch' trains LoRA adapters only; expected WakeConfig(train='adapters')")
            if store_config is not None and store_config.latent_layer is not None:
                problems.append("engine='executorch' stores inputs; expected StoreConfig(latent_layer=None)")
            if problems:
                raise ConfigError("EdgeSleep", problems)
        if sleep.consolidate == "adapted" and wake.train != "adapters":
            raise ConfigError("EdgeSleep", ["SleepConfig(consolidate='adapted') consolidates the layers that carry "
                                            "adapters, and WakeConfig(train='all') attaches none; expected "
                                            "WakeConfig(train='adapters'). Fix: that, or consolidate='all'"])
        if not isinstance(model, nn.Module):
            raise ConfigError("EdgeSleep", [f"model is a {type(model).__name__}; expected an nn.Module"])
        if next(model.parameters(), None) is None:
            raise ConfigError("EdgeSleep", [f"model ({type(model).__name__}) has no parameters; expected a model "
                                            "with weights to learn"])
        from_peft = bool(peft_lora_layers(model))
        if from_peft:  # a model with PEFT's LoRA keeps its adapters (checked before anything changes)
            problems = peft_problems(model)
            if wake.train != "adapters":
                problems.append("the model has PEFT LoRA adapters and WakeConfig(train='all') would train its base "
                                "too; expected WakeConfig(train='adapters'). Fix: that, or hand over "
                                "model.merge_and_unload()")
            if problems:
                raise ConfigError("EdgeSleep", problems)
        self.model = model
        self.privacy = privacy or PrivacyConfig()
        # noise from os.urandom, unless a seed asks for repeatable (not private) noise in tests
        self._privacy_generator = (None if self.privacy.noise_seed is None
                                   else torch.Generator().manual_seed(self.privacy.noise_seed))
        self.wake_config, self.sleep_config = wake, sleep
        self.seed = seed
        store_config = store_config or (store.config if isinstance(store, ReplayStore) else StoreConfig())
        self.store_config = store_config
        names = self.sleep_config.noise_layers
        unknown = sorted(set(names or ()) - {n for n, _ in model.named_modules()})
        if unknown:  # checked before the store opens or the model changes
            raise ConfigError("SleepConfig", [f"noise_layers names {unknown} that the model does not "
                                              "have; expected names from model.named_modules()"])
        self._encoder: nn.Module = nn.Identity()
        self._head: nn.Module = model
        if store_config.latent_layer is not None:
            self._encoder, self._head = split_sequential(model, store_config.latent_layer)
        fingerprint = model_fingerprint(model, store_config.latent_layer)
        if isinstance(store, ReplayStore):
            store.bind(fingerprint)
            self.store = store
        else:
            path = ":memory:" if store is None else store
            self.store = ReplayStore(path, store_config, fingerprint=fingerprint, seed=seed, key=store_key)
        self.fingerprint = fingerprint

        if from_peft:  # PEFT's ranks and scales; its modules_to_save copies stay trainable
            adopt_peft_(model)
        elif self.wake_config.train == "adapters":
            attach_lora(model, rank=self.wake_config.lora_rank, alpha=self.wake_config.lora_alpha)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        self._wake_params = [p for p in model.parameters() if p.requires_grad]
        self._sleep_params = {n: p for n, p in model.named_parameters() if ".lora_" not in n
                              and not n.startswith("lora_") and ".original_module." not in n}
        self.skipped_steps = 0
        self.prunable = [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                         if (isinstance(m, _PRUNABLE) or is_conv1d(m)) and ".original_module" not in f".{n}"]
        if self.sleep_config.consolidate == "adapted":  # only what a day can change
            days = {f"{n}.{k}" if n else k for n in lora_modules(model) for k in ("weight", "bias")}
            days |= {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in f".{n}"}
            self._sleep_params = {n: p for n, p in self._sleep_params.items() if n in days}
            self.prunable = [n for n in self.prunable if n in self._sleep_params]
        # anchor the weight matrices and biases the model computes with
        self._anchored = [n for n in self._sleep_params if n.endswith(("weight", "bias"))]
        names = self.sleep_config.noise_layers
        self.noise_layers = activation_module_names(model) if names is None else list(names)
        self.anchor = Anchor(self.sleep_config.anchor_decay)
        self.masks: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.wake_steps_since_sleep = 0
        self.num_classes: int | None = None
        self.input_spec: tuple[tuple[int, ...], bool] | None = None  # (shape[1:], is_float)
        # token ids must index the model's first embedding table (its vocabulary); None: no embedding
        self.vocab_size: int | None = next((m.num_embeddings for m in model.modules()
                                            if isinstance(m, nn.Embedding)), None)
        # and a row of them must fit the positions a Hugging Face model has (None: no such limit)
        positions = (getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in model.modules())
        self.max_length: int | None = next((n for n in positions if isinstance(n, int)), None)
        self.sleep_state: SleepState | None = None
        # design="stats": the day's clipped latents per (stream, class), released at the next night
        self.class_stats: StatsAccumulator | None = None
        self._call_lock = threading.RLock()
        self.engine = engine
        self._engine: Engine = self._make_engine(engine)

    def _make_engine(self, name: str) -> Engine:
        if name == "executorch":
            from edge_sleep.engines.executorch_engine import ExecuTorchEngine  # loads ExecuTorch

            return ExecuTorchEngine()  # exports on first use, and again after each night or load
        return TorchEngine(self._wake_params, self.wake_config.lr, self._forward, self._replay_forward)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (inputs and replayed records are moved there)."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    @property
    def base_parameters(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the base weights: what a night trains and the anchor protects."""
        return dict(self._sleep_params)

    @property
    def encoder(self) -> nn.Module:
        """Stored record <- input: the model's layers up to ``StoreConfig.latent_layer`` (the
        identity when the store keeps inputs)."""
        return self._encoder

    @property
    def replay_head(self) -> nn.Module:
        """Logits <- stored record: the layers a night replays records through."""
        return self._head

    # ----------------------------------------------------------------- input
    def check_input(self, x: Any, name: str = "x") -> torch.Tensor:
        """``x`` checked as a batch of this model's inputs and moved to its device.

        Raises:
            InputError: not a tensor, an empty batch, a complex or bool dtype, a float dtype other
                than the model's, NaN/inf, token ids outside the vocabulary of the model's first
                ``nn.Embedding``, rows of token ids longer than a Hugging Face model's
                ``max_position_embeddings``, or a per-example shape or dtype kind other than the batches
                learned from so far.
        """
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} is a {type(x).__name__}; expected a torch.Tensor batch. "
                             "Fix: torch.as_tensor(x).")
        if x.ndim < 1 or x.shape[0] == 0:
            raise InputError(f"{name} has shape {tuple(x.shape)}; expected a non-empty batch (B, ...).")
        if x.is_complex() or x.dtype == torch.bool:
            raise InputError(f"{name} has dtype {x.dtype}; expected a float or integer tensor.")
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if x.is_floating_point() and param is not None and x.dtype != param.dtype:
            raise InputError(f"{name} has dtype {x.dtype}; this model computes in {param.dtype}. "
                             f"Fix: {name}.to({param.dtype}).")
        if x.is_floating_point() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=tuple(range(1, x.ndim))).sum()) if x.ndim > 1 else 1
            raise InputError(f"{name} holds NaN or inf in {bad} of {x.shape[0]} rows; expected finite "
                             "values. Fix: drop or clean those rows (nothing was learned or stored).")
        if not x.is_floating_point() and self.vocab_size is not None:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise InputError(f"{name} holds token id {bad}; this model's vocabulary has {self.vocab_size} ids, "
                                 f"so ids must be in [0, {self.vocab_size - 1}]. Fix: tokenize with this model's "
                                 "tokenizer (nothing was learned or stored).")
            if self.max_length is not None and x.ndim >= 2 and x.shape[1] > self.max_length:
                raise InputError(f"{name} has rows of {x.shape[1]} tokens; this model has {self.max_length} positions. "
                                 f"Fix: tokenize with truncation=True, max_length={self.max_length} (nothing was "
                                 "learned or stored).")
        spec = (tuple(x.shape[1:]), x.is_floating_point())
        if self.input_spec is not None and spec != self.input_spec:
            want, was_float = self.input_spec
            raise InputError(
                f"{name} has per-example shape {spec[0]} and {'float' if spec[1] else 'integer'} dtype "
                f"{x.dtype}; this model was fed shape {want} of {'float' if was_float else 'integer'} "
                "dtype. Fix: reshape/cast the batch to match."
            )
        return x.to(self.device)

    def _check_labels(self, y: Any, n: int) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            kind = type(y).__name__ if not isinstance(y, torch.Tensor) else str(y.dtype)
            raise InputError(f"y is {kind}; expected an integer tensor of class indices. Fix: y.long().")
        if y.shape != (n,):
            raise InputError(f"y has shape {tuple(y.shape)}; expected ({n},), one label per example.")
        assert self.num_classes is not None
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise InputError(f"label {bad} is out of range; the model has {self.num_classes} outputs, "
                             f"so labels must be in [0, {self.num_classes - 1}].")
        return y.long().to(self.device)

    def _probe(self, x: torch.Tensor) -> None:
        """Learn the input spec and the number of classes from the first batch (no state changes)."""
        if self.num_classes is not None:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = logits_of(self.model(x[:1]))
        finally:
            self.model.train(was_training)
        if out.ndim != 2:
            raise InputError(f"the model returned logits of shape {tuple(out.shape)} for one example; "
                             "expected (1, num_classes). Fix: make forward return (B, C) logits.")
        self.num_classes = int(out.shape[1])
        self.input_spec = (tuple(x.shape[1:]), x.is_floating_point())

    # ------------------------------------------------------------------- day
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self._encoder(x)
        return latent, logits_of(self._head(latent))

    def _replay_forward(self, latent: torch.Tensor) -> torch.Tensor:
        return logits_of(self._head(latent))

    @_serialized
    def learn(self, x: torch.Tensor, y: torch.Tensor, *, stream: str = "") -> WakeStats:
        """One wake step on a labelled batch; the batch is offered to the replay store.

        Args:
            x: inputs ``(B, ...)``, float (finite) or integer (token ids).
            y: integer labels ``(B,)`` in ``[0, num_classes)``.
            stream: a tag kept with the stored records (task, user, source...).

        Returns:
            :class:`WakeStats`. When the step's loss, gradient or weights go non-finite the step
            is undone, nothing is stored, ``stats.skipped`` says why and a ``RuntimeWarning``
            is issued.

        Raises:
            InputError: bad shape, dtype, NaN/inf or label range; nothing is learned or stored.
            StoreError: the batch could not be written (a closed or busy store, a full disk...);
                the step is undone, so the weights and the store stay in step.
        """
        x, y = self._checked_batch(x, y, "learn")
        self._engine.check_batch(self, x)  # before the store's generator moves
        with self._generators_kept_on_error():
            return self._learn_checked(x, y, stream)

    def _checked_batch(self, x: Any, y: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and ``y`` checked for :meth:`learn` or :meth:`remember`: the inputs, what privacy
        needs of them, the labels and tonight's statistics (the first batch also sets the spec)."""
        x = self.check_input(x)
        if self.privacy.epsilon is not None and not x.is_floating_point() and self.store_config.latent_layer is None:
            raise InputError(f"{who} got integer inputs ({x.dtype}) with PrivacyConfig(epsilon={self.privacy.epsilon}); "
                             "expected float latents to noise. Fix: store a float hidden state with "
                             "StoreConfig(latent_layer=...), or set epsilon=None (label privacy still applies).")
        if self.num_classes is None:
            self._probe(x)
        y = self._check_labels(y, x.shape[0])
        if self.privacy.design == "stats":
            self._check_stats_batch(x.shape[0])
        return x, y

    @contextlib.contextmanager
    def _generators_kept_on_error(self) -> Iterator[None]:
        """A call that raises leaves the store's and the privacy generators where they were, so a
        retry draws what a clean run draws."""
        generators = (self.store.rng.bit_generator.state,
                      None if self._privacy_generator is None else self._privacy_generator.get_state())
        try:
            yield
        except BaseException:
            self.store.rng.bit_generator.state = generators[0]
            if generators[1] is not None and self._privacy_generator is not None:
                self._privacy_generator.set_state(generators[1])
            raise

    def _learn_checked(self, x: torch.Tensor, y: torch.Tensor, stream: str) -> WakeStats:
        cfg = self.wake_config
        self.model.train()
        r1 = r2 = None
        if cfg.replay_batch > 0 and len(self.store) > 0:
            if cfg.replay_alpha > 0:
                r1 = self.store.sample(cfg.replay_batch).to(self.device)
            if cfg.replay_beta > 0:
                r2 = self.store.sample(cfg.replay_batch).to(self.device)
        losses, latent, logits = self._engine.step(self, x, y, r1, r2)
        replayed = sum(int(r.y.shape[0]) for r in (r1, r2) if r is not None)
        stats = WakeStats(losses["loss"], losses["new_loss"], losses["replay_loss"], losses["penalty"],
                          int(x.shape[0]), 0, losses["grad_norm"], replayed, losses["skipped"])
        if stats.skipped is not None:
            self.skipped_steps += 1
            warnings.warn(f"learn() undid a wake step: {stats.skipped} (loss {stats.loss:.4g}, gradient "
                          f"norm {stats.grad_norm:.4g}); the weights are unchanged and the batch was not "
                          "stored. Fix: lower WakeConfig.lr or max_grad_norm, or check the batch's scale.",
                          RuntimeWarning, stacklevel=4)
            return stats
        if self.masks and cfg.train == "all":
            apply_masks_(dict(self.model.named_parameters()), self.masks)
        where = self._keep(latent, y, logits, stream, stepped=True)
        if where is None:
            return stats
        return dataclasses.replace(stats, stored=int(np.count_nonzero(where >= 0)), slots=tuple(where.tolist()))

    def _keep(self, latent: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None, stream: str, *,
              stepped: bool) -> np.ndarray | None:
        """Offer a checked batch to the store (or tonight's class statistics) and count the wake step.

        With ``stepped``, a failure undoes the wake step just taken, so the weights and the store
        stay in step: both or neither. Returns the store's slots, or ``None`` when nothing was offered.
        """
        where = None
        try:
            if self.privacy.design == "stats":  # nothing of this batch is stored; its statistics wait for the night
                self._stats_for(latent).add(latent, y, stream)
            elif self.wake_steps_since_sleep % self.wake_config.store_every == 0:
                record = None
                if self.privacy.enabled:  # what is stored is private; its logits are post-processing
                    noised, y, record = privatize(latent, y, self.privacy, int(self.num_classes or 2),
                                                  self._privacy_generator)
                    if logits is not None and noised is not latent:
                        # of the noised latent, by the weights before this step: weights that had
                        # trained on the raw batch would carry it into the record (issue 20)
                        with self._engine.weights_before_step(self) if stepped else contextlib.nullcontext():
                            logits = self.record_logits(noised)
                    latent = noised
                where = self.store.offer(latent, y, logits, stream=stream, privacy=record)
        except BaseException:  # the store and the weights stay in step: both or neither
            if stepped:
                self._engine.undo_step(self)
            raise
        self.wake_steps_since_sleep += 1
        return where

    @_serialized
    def remember(self, x: torch.Tensor, y: torch.Tensor, *, stream: str = "",
                 logits: torch.Tensor | None = None) -> int:
        """Offer a labelled batch to the replay store without taking a wake step.

        For a model that another loop trains by day (a Hugging Face ``Trainer``: see
        :class:`edge_sleep.integrations.transformers.EdgeSleepCallback`). The batch counts as one
        wake step toward tonight's planned length and ``WakeConfig.store_every``, and the store's
        privacy applies as in :meth:`learn`.

        Args:
            x: inputs ``(B, ...)``, as for :meth:`learn`.
            y: integer labels ``(B,)``.
            stream: a tag kept with the stored records.
            logits: the logits ``(B, C)`` the training loop's forward gave this batch, kept with the
                records; ``None`` computes them in eval mode (when the store keeps logits).

        Returns:
            How many of the batch's records the store kept.

        Raises:
            InputError: bad inputs, labels or logits; nothing is stored.
            StoreError: the batch could not be written; the store is unchanged.
        """
        x, y = self._checked_batch(x, y, "remember")
        if logits is not None:
            want = (x.shape[0], self.num_classes)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want or not logits.is_floating_point():
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise InputError(f"logits is {got}; expected a float tensor of shape {want}, one row of class "
                                 "scores per example. Fix: pass the model's output logits for this batch, or None.")
            if not torch.isfinite(logits).all():
                raise InputError("logits hold NaN or inf; expected finite values. Nothing was stored. Fix: skip "
                                 "this batch (its training step diverged) or pass logits=None.")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                latent = self._encoder(x)
                if logits is None and self.store_config.store_logits is not False:
                    logits = self._replay_forward(latent)
        finally:
            self.model.train(was_training)
        logits = None if logits is None else logits.detach().to(self.device)
        with self._generators_kept_on_error():
            where = self._keep(latent, y, logits, stream, stepped=False)
        return 0 if where is None else int(np.count_nonzero(where >= 0))

    def anchor_penalty(self, lr: float | None = None) -> torch.Tensor:
        """The anchor's penalty on the weights as they stand, differentiable in what trains by day.

        ``WakeConfig.anchor_lambda`` x the capped Fisher x the squared move from the last night's
        weights (adapters folded in); zero before the first night. A training loop other than
        :meth:`learn` adds it to its loss (or backpropagates it before its optimizer step).

        Args:
            lr: the learning rate that caps ``lambda * F`` at ``1 / (2 lr)``; ``None`` is ``WakeConfig.lr``.
        """
        cfg = self.wake_config
        if not self.anchor or cfg.anchor_lambda <= 0:
            return torch.zeros((), device=self.device)
        return self.anchor.penalty(effective_weights(self.model, list(self.anchor.fisher)), cfg.anchor_lambda,
                                   cfg.lr if lr is None else lr)

    def _check_stats_batch(self, n: int) -> None:
        """Refuse a batch that would make the night's release fail its delta (before anything moves)."""
        held = 0 if self.class_stats is None else self.class_stats.examples
        if self.privacy.delta * (held + n) >= 1:
            raise InputError(f"learn would bring tonight's class statistics to {held + n} examples with PrivacyConfig("
                             f"delta={self.privacy.delta:g}); expected delta below 1/{held + n}: one of them would be "
                             "expected to leak outright. Nothing was learned or stored. Fix: sleep() more often, or "
                             "a smaller delta")

    def _stats_for(self, latent: torch.Tensor) -> StatsAccumulator:
        if self.class_stats is None:
            self.class_stats = StatsAccumulator(int(self.num_classes or 2), tuple(latent.shape[1:]),
                                                self.privacy.max_norm)
        return self.class_stats

    def _release_dreams(self) -> int:
        """design="stats": release the day's class statistics and offer the store their dreams."""
        acc = self.class_stats
        if self.privacy.design != "stats" or acc is None or acc.examples == 0:
            return 0
        was_training = self.model.training
        try:
            keep_logits = self.store_config.store_logits is not False
            return release_dreams(acc, self.privacy, self.store, self.record_logits if keep_logits else None,
                                  self.generator, self._privacy_generator)
        finally:
            self.model.train(was_training)

    @_serialized
    @torch.no_grad()
    def logits(self, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """Logits ``(B, C)`` in eval mode, computed in batches of ``batch_size``."""
        return self._engine.logits(self, self.check_input(x), batch_size)

    @_serialized
    @torch.no_grad()
    def record_logits(self, latents: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """Logits ``(B, C)`` in eval mode of stored records' latents (``store.read(slots).x``)."""
        was_training = self.model.training
        self.model.eval()
        try:
            latents = latents.to(self.device)
            return torch.cat([self._replay_forward(latents[i:i + batch_size])
                              for i in range(0, latents.shape[0], batch_size)])
        finally:
            self.model.train(was_training)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class indices ``(B,)``."""
        return self.logits(x).argmax(dim=1)

    # ----------------------------------------------------------------- night
    def planned_sleep_steps(self) -> int:
        """Replay steps tonight's sleep would run: ``steps_per_wake_step`` x wake steps, >= min_steps."""
        if self.wake_steps_since_sleep == 0:
            return 0
        cfg = self.sleep_config
        return max(cfg.min_steps, round(cfg.steps_per_wake_step * self.wake_steps_since_sleep))

    @_serialized
    def sleep(
        self,
        steps: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SleepReport:
        """Run (or resume) a night of Synaptic Sleep Replay.

        Args:
            steps: replay steps; ``None`` uses :meth:`planned_sleep_steps`. Ignored when resuming.
            should_stop: asked between chunks of steps; return ``True`` to wake up (the night's
                progress is kept and the next ``sleep`` call resumes it).
            progress: called with the number of steps just run (e.g. ``tqdm.update``).

        Returns:
            A :class:`SleepReport`. A night whose loss, gradients, weights or Fisher go non-finite
            is abandoned: the weights go back to where this call started, ``report.aborted``
            says why, and a ``RuntimeWarning`` is issued.

        Raises:
            CallOrderError: the store is empty (call ``learn`` first).
        """
        check_blendable(self.store, self.sleep_config.dream_fraction)  # before anything changes
        if self.sleep_state is None:
            total = self.planned_sleep_steps() if steps is None else int(steps)
            if total < 0:
                raise ConfigError("sleep", [f"steps={steps}; expected >= 0"])
            self._release_dreams()  # design="stats": the day's statistics become the store's dreams
            if total > 0 and len(self.store) == 0:
                raise CallOrderError("sleep() found an empty replay store; call learn() with some "
                                     "examples before sleep().")
            self.sleep_state = SleepState(total_steps=total, wake_steps=self.wake_steps_since_sleep)
        self._engine.weights_changed()  # the night changes the weights the programs were exported with
        if self.wake_config.train == "adapters":
            # consolidate the day's adapters into the base; on a resumed night, also what was
            # learned between its halves (merging does not change the function)
            merge_lora_(self.model)
            apply_masks_(dict(self.model.named_parameters()), self.masks)
        night = self.sleep_state
        self.model.train()
        report = run_sleep(self._night(), self.store, self.sleep_config, night,
                           should_stop=should_stop, progress=progress)
        if report.aborted is not None:
            self.sleep_state = None  # its partial Fisher cannot be trusted; the next night starts anew
            warnings.warn(f"sleep() abandoned the night: {report.aborted}. The weights are back where this "
                          "call started and nothing was pruned or anchored. Fix: lower SleepConfig.lr, or "
                          "check the replay store for extreme records.", RuntimeWarning, stacklevel=2)
        if report.completed:
            # wake steps taken while the night was preempted count for the next one
            self.wake_steps_since_sleep = max(0, self.wake_steps_since_sleep - night.wake_steps)
            self.sleep_state = None
            self._sync_lora_masks()
        return report

    def _night(self) -> Night:
        """What tonight works on: the base weights, the masks, the anchor, the noise's layers."""
        return Night(self.model, params=self._sleep_params, prunable=self.prunable, masks=self.masks,
                     anchor=self.anchor if self.wake_config.anchor_lambda > 0 else None,
                     noise_layers=self.noise_layers, replay_forward=self._replay_forward,
                     generator=self.generator)

    def _sync_lora_masks(self) -> None:
        """Give each adapted layer its keep-mask, so pruned weights stay zero in the adapter's update."""
        for name, module in lora_modules(self.model).items():
            module.set_mask_(self.masks.get(f"{name}.weight" if name else "weight"))

    # ----------------------------------------------------------------- state
    @_serialized
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, anchor, masks, sleep progress, generators."""
        return {
            "format_version": RUNTIME_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "anchor": self.anchor.state_dict(),
            "masks": dict(self.masks),
            "wake_steps_since_sleep": self.wake_steps_since_sleep,
            "num_classes": self.num_classes,
            "input_spec": self.input_spec,
            "sleep_state": None if self.sleep_state is None else self.sleep_state.state_dict(),
            "generator": self.generator.get_state(),
            "store": self.store.state_dict(),
            "class_stats": None if self.class_stats is None else self.class_stats.state_dict(),
        }

    @_serialized
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            FormatVersionError: newer format version.
            ConfigError: the state belongs to a model of another architecture.
        """
        check_format_version("EdgeSleep state", state.get("format_version"), RUNTIME_FORMAT_VERSION)
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError("EdgeSleep", [f"state fingerprint {state['fingerprint']!r} differs from "
                                            f"this model's {self.fingerprint!r}; load it into the model "
                                            "architecture it was saved from"])
        # validate every part before changing anything
        ss = state["sleep_state"]
        sleep_state = None if ss is None else SleepState.from_state_dict(ss)
        check_format_version("Anchor state", state["anchor"].get("format_version"), ANCHOR_FORMAT_VERSION)
        check_format_version("ReplayStore state", state["store"].get("format_version"), STORE_FORMAT_VERSION)
        self._check_state_tensors(state)
        cs = state.get("class_stats")
        class_stats = None if cs is None else StatsAccumulator.from_state_dict(cs)
        self.model.load_state_dict(state["model"])
        self.anchor.load_state_dict(state["anchor"])
        self.masks = dict(state["masks"])
        self._sync_lora_masks()
        self.wake_steps_since_sleep = int(state["wake_steps_since_sleep"])
        self.num_classes = state["num_classes"]
        spec = state["input_spec"]
        self.input_spec = None if spec is None else (tuple(spec[0]), bool(spec[1]))
        self.sleep_state = sleep_state
        self._engine.weights_changed()
        self.generator.set_state(state["generator"])
        self.store.load_state_dict(state["store"])
        self.class_stats = class_stats

    def _check_state_tensors(self, state: dict[str, Any]) -> None:
        """Every tensor of ``state`` has a name and shape this runtime knows (nothing is changed).

        ``nn.Module.load_state_dict`` copies the tensors it can before it reports the others, so
        a mismatch found there would leave the model half-loaded.

        Raises:
            ConfigError: unknown or missing names, or shapes that differ; all of them listed.
        """
        problems: list[str] = []
        own = self.model.state_dict()
        theirs = state["model"]
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        if missing:
            problems.append(f"model weights missing from the state: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"model weights this model does not have: {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
        params = dict(self.model.named_parameters())
        for where, tensors in (("model", theirs), ("masks", state["masks"]),
                               ("anchor fisher", state["anchor"]["fisher"]),
                               ("anchor reference", state["anchor"]["reference"])):
            ref = own if where == "model" else params
            for name, t in tensors.items():
                if where != "model" and name not in ref:
                    problems.append(f"{where} names {name!r}, which this model does not have")
                elif name in ref and tuple(t.shape) != tuple(ref[name].shape):
                    problems.append(f"{where} {name!r} has shape {tuple(t.shape)}; this model's is "
                                    f"{tuple(ref[name].shape)}")
        if problems:
            raise ConfigError("EdgeSleep state", problems + [
                "Fix: load the state into a model of the architecture (and WakeConfig) it was saved with"])

    @_serialized
    def save(self, directory: str | Path) -> Path:
        """Write ``state.pt`` and ``config.json`` to ``directory`` atomically (all or nothing).

        The replay store stays where it is; ``config.json`` records its path. Runtimes saving to
        one folder at once (threads or processes) each complete; the last one wins.

        Raises:
            CheckpointError: ``directory`` exists and is not a folder (refused before anything is
                written), or the files cannot be written (a full disk, no permission); the
                checkpoint already there, if any, is unchanged.
        """
        directory = Path(directory)
        state = self.state_dict()
        meta = {
            "format_version": RUNTIME_FORMAT_VERSION,
            "wake": dataclasses.asdict(self.wake_config),
            "sleep": dataclasses.asdict(self.sleep_config),
            "store_config": dataclasses.asdict(self.store_config),
            "store_path": str(self.store.path.resolve()) if str(self.store.path) != ":memory:" else None,
            "seed": self.seed,
            "engine": self.engine,
            "privacy": dataclasses.asdict(self.privacy),
        }
        try:
            with atomic_directory(directory) as tmp:
                torch.save(state, tmp / "state.pt")
                (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        except EdgeSleepError:
            raise
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            reason = first_line(e, type(e).__name__)
            raise CheckpointError(
                f"EdgeSleep.save could not write the checkpoint {str(directory)!r}: {reason}; the checkpoint "
                f"there before (if any) is unchanged. Fix: free space on the disk of {str(directory.parent)!r} "
                "and check that it is writable, then save again.") from e
        return directory

    @_serialized
    def save_adapters(self, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
        """Write the adapters as a folder PEFT loads (``PeftModel.from_pretrained(base, directory)``).

        The adapters are what was learned since the last night, on the base as it stands: write
        that base with :meth:`save_base`. See :func:`edge_sleep.integrations.peft.save_adapters`.
        """
        return save_adapters(self.model, directory, base_model_name_or_path=base_model_name_or_path)

    @_serialized
    def save_base(self, directory: str | Path) -> Path:
        """Write the base weights without adapters (a Hugging Face model folder for a Hugging Face
        model). See :func:`edge_sleep.integrations.peft.save_base`."""
        return save_base(self.model, directory)

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, *, store: ReplayStore | str | Path | None = None,
             store_key: bytes | None = None, engine: str | None = None) -> EdgeSleep:
        """Rebuild a runtime saved by :meth:`save` around a fresh ``model`` of the same architecture.

        Args:
            directory: what :meth:`save` wrote.
            model: a new instance of the saved model's class (weights are overwritten).
            store: the replay store; default: the path recorded at save time.
            store_key: the key of an encrypted store (not kept in the checkpoint).
            engine: ``"torch"`` or ``"executorch"``; ``None``: the engine it was saved with.

        Raises:
            CallOrderError: no checkpoint at ``directory`` (no ``config.json``).
            CheckpointError: ``config.json`` is not JSON or lacks keys, or ``state.pt`` is missing,
                truncated, damaged or lacks keys (each names the file).
            FormatVersionError: the checkpoint was written by a newer version.
            ConfigError: the checkpoint belongs to a model of another architecture.
        """
        directory = Path(directory)
        old = previous_of(directory)
        if not directory.exists() and old.is_dir():  # a crash between save()'s two renames
            directory = old
        if not (directory / "config.json").exists():
            raise CallOrderError(f"no checkpoint at {str(directory)!r} (config.json is missing); "
                                 "expected a folder written by EdgeSleep.save(). Fix: check the path.")
        config_path, state_path = directory / "config.json", directory / "state.pt"
        fix = "Fix: pass an intact checkpoint (save it again, or restore a copy)."

        def damaged(path: Path, problem: str, expected: str) -> CheckpointError:
            return CheckpointError(f"{str(path)!r} {problem}; expected {expected}. {fix}")

        try:
            meta = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            reason = first_line(e, type(e).__name__)
            raise damaged(config_path, f"cannot be read as JSON ({reason})",
                          "the config.json EdgeSleep.save() writes") from e
        if not isinstance(meta, dict):
            raise damaged(config_path, f"holds a JSON {type(meta).__name__}", "a JSON object")
        if "format_version" in meta:  # a newer version may have other keys: say that first
            check_format_version(f"checkpoint {str(directory)!r}", meta["format_version"], RUNTIME_FORMAT_VERSION)
        missing = [k for k in ("format_version", "wake", "sleep", "store_config", "store_path", "seed")
                   if k not in meta]
        mistyped = [k for k in ("wake", "sleep", "store_config", "privacy")
                    if k in meta and not isinstance(meta[k], dict)]
        if missing or mistyped:
            problems = ([f"lacks the key(s) {missing}"] if missing else []) + (
                [f"has {mistyped} that are not JSON objects"] if mistyped else [])
            raise damaged(config_path, " and ".join(problems), "every key EdgeSleep.save() writes, as it wrote it")
        if not state_path.is_file():
            raise damaged(state_path, "is missing", "the state.pt EdgeSleep.save() writes beside config.json")
        try:
            state = torch.load(state_path, weights_only=True)
        except Exception as e:  # a damaged file raises OSError, EOFError, KeyError, UnpicklingError, ...
            reason = first_line(e, "no detail")
            raise damaged(state_path, f"cannot be read ({type(e).__name__}: {reason}); it is truncated or damaged",
                          "the state.pt EdgeSleep.save() writes") from e
        if not isinstance(state, dict):
            raise damaged(state_path, f"holds a {type(state).__name__}", "the dict EdgeSleep.state_dict() returns")
        if "format_version" in state:
            check_format_version("EdgeSleep state", state["format_version"], RUNTIME_FORMAT_VERSION)
        missing = [k for k in ("format_version", "fingerprint", "model", "anchor", "masks", "wake_steps_since_sleep",
                               "num_classes", "input_spec", "sleep_state", "generator", "store") if k not in state]
        if missing:
            raise damaged(state_path, f"lacks the key(s) {missing}", "the dict EdgeSleep.state_dict() returns")
        store_config = config_from_dict(StoreConfig, meta["store_config"])
        fingerprint = model_fingerprint(model, store_config.latent_layer)
        if state["fingerprint"] != fingerprint:  # before the model gets adapters or the store opens
            raise ConfigError("EdgeSleep.load", [
                f"checkpoint {str(directory)!r} has fingerprint {state['fingerprint']!r}; this model's is "
                f"{fingerprint!r}. Fix: pass a fresh model of the architecture the checkpoint was saved from"])
        es = cls(
            model,
            store=store if store is not None else meta["store_path"],
            store_config=store_config,
            wake=config_from_dict(WakeConfig, meta["wake"]),
            sleep=config_from_dict(SleepConfig, meta["sleep"]),
            seed=meta["seed"],
            engine=meta.get("engine", "torch") if engine is None else engine,
            privacy=config_from_dict(PrivacyConfig, meta.get("privacy", {})),
            store_key=store_key,
        )
        try:
            es.load_state_dict(state)
        except BaseException:
            es.store.close()  # the store is not left locked by a runtime the caller never got
            raise
        return es
