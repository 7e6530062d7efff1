"""The night: Synaptic Sleep Replay (design.md section 3), read top to bottom.

``run_sleep`` does, in order:

1. **Phase 1, replay with consolidation noise.** Draw records from the store, add zero-mean
   Gaussian noise (std relative to the activation's RMS) to the chosen hidden states with
   forward hooks, and step on ``label_weight * CE(label) + distill_weight * MSE(stored logits)``.
   During the last ``fisher_steps`` steps, accumulate per-sample squared gradients of the clean
   replay loss (chunked over samples and parameter groups): the empirical diagonal Fisher ``F``.
   Between chunks of ``check_every`` steps ask ``should_stop``; on "wake up" return with the
   progress (Fisher partial sums, position) kept in a :class:`SleepState`. Each weight takes its
   SGD step as soon as backward has its gradient, so no model-sized set of gradients is held.
2. **Phase 2, significance.** ``s = F * w^2`` per weight matrix; prune the ``prune_frac`` least
   significant alive weights (the mask persists, up to ``sparsity_cap``); scale the
   ``strengthen_frac`` most significant by ``1 + eta``.
3. **Protect.** Fold ``F`` into the online anchor used by the next wake.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_sleep.config import SleepConfig
from edge_sleep.errors import ConfigError, StoreError, check_format_version
from edge_sleep.fisher import FisherPlan, fisher_sums, fisher_sums_loop, fisher_sums_streamed, plan_fisher
from edge_sleep.kernels import consolidate_, prune_count
from edge_sleep.memory import ResidentPeak, saved_activation_bytes
from edge_sleep.mixup import mix_records
from edge_sleep.store import ReplayStore
from edge_sleep.wake import Anchor, all_finite, effective_weights, elements_finite

__all__ = ["Night", "SleepState", "SleepReport", "ConsolidationNoise", "replay_loss", "run_sleep",
           "consolidate_weights_", "mask_sparsity", "SLEEP_FORMAT_VERSION"]

SLEEP_FORMAT_VERSION = 2


def replay_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                label_weight: float, distill_weight: float) -> torch.Tensor:
    """``label_weight * CE(logits, y) + distill_weight * MSE(logits, target)`` (mean over the batch).

    ``y`` is class indices ``(n,)`` or class probabilities ``(n, C)`` (a dream's soft label).
    """
    loss = label_weight * F.cross_entropy(logits, y)
    if target is not None and distill_weight > 0:
        loss = loss + distill_weight * F.mse_loss(logits, target)
    return loss


class ConsolidationNoise:
    """Forward hooks adding ``std * rms(h) * N(0, 1)`` to the outputs of the named modules.

    Args:
        model: the model to hook.
        names: module names whose outputs get noise.
        std: noise std relative to each sample's activation RMS.
        generator: the source of the noise (passed in so results repeat). A CPU generator; for
            activations on another device a generator there is seeded from it once.
    """

    def __init__(self, model: nn.Module, names: list[str], std: float, generator: torch.Generator) -> None:
        self.std = std
        self.enabled = True
        self.generator = generator
        self._device_generators: dict[torch.device, torch.Generator] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook) for n in names] if std > 0 else []

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        if device not in self._device_generators:
            seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            self._device_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._device_generators[device]

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not self.enabled or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        dims = tuple(range(1, output.ndim))
        rms = output.detach().pow(2).mean(dim=dims, keepdim=True).sqrt() if dims else output.detach().abs()
        noise = torch.randn(output.shape, generator=self._generator_for(output.device), dtype=output.dtype,
                            device=output.device)
        return output + self.std * rms * noise

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass(frozen=True)
class Night:
    """What a night works on (built by the runtime for each :func:`run_sleep` call).

    Attributes:
        model: the model; its ``params`` are trained, the rest stay fixed.
        params: ``{name: parameter}`` trained during sleep (the base weights).
        prunable: names of the weight matrices Phase 2 prunes and strengthens.
        masks: persistent keep-masks, updated in place.
        anchor: the wake-time anchor to fold the Fisher into (``None`` to leave it).
        noise_layers: modules whose outputs get consolidation noise.
        replay_forward: ``latent -> logits`` for stored latents.
        generator: randomness of the noise.
    """

    model: nn.Module
    params: dict[str, torch.nn.Parameter]
    prunable: list[str]
    masks: dict[str, torch.Tensor]
    anchor: Anchor | None
    noise_layers: list[str]
    replay_forward: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator


PROBE_MIN_GAIN = 1e-4  # a look improves on the best when the probe's loss is lower by more than this fraction


@dataclass
class SleepState:
    """Progress of a night, kept when sleep is preempted so the next window resumes it.

    ``wake_steps`` is how many wake steps the night was planned for; steps learned while it is
    preempted count toward the next night.
    """

    total_steps: int
    wake_steps: int = 0
    step: int = 0
    fisher_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher_count: int = 0
    loss_first: float | None = None
    probe_slots: list[int] | None = None
    probe_first: float | None = None
    probe_best: float | None = None
    probe_bad: int = 0
    replay_stopped: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": SLEEP_FORMAT_VERSION, "total_steps": self.total_steps,
                # "optimizer": always None now (plain SGD keeps no state), kept for older readers
                "wake_steps": self.wake_steps, "step": self.step, "optimizer": None,
                "fisher_sums": self.fisher_sums, "fisher_count": self.fisher_count, "loss_first": self.loss_first,
                "probe_slots": self.probe_slots, "probe_first": self.probe_first, "probe_best": self.probe_best,
                "probe_bad": self.probe_bad, "replay_stopped": self.replay_stopped}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SleepState:
        check_format_version("SleepState", state.get("format_version"), SLEEP_FORMAT_VERSION)
        return cls(total_steps=state["total_steps"], wake_steps=int(state.get("wake_steps", 0)),
                   step=state["step"],
                   fisher_sums=dict(state["fisher_sums"]), fisher_count=state["fisher_count"],
                   loss_first=state["loss_first"], probe_slots=state.get("probe_slots"),
                   probe_first=state.get("probe_first"), probe_best=state.get("probe_best"),
                   probe_bad=int(state.get("probe_bad", 0)), replay_stopped=state.get("replay_stopped"))


@dataclass(frozen=True)
class SleepReport:
    """What a night did.

    Attributes:
        steps: replay steps run in this call.
        total_steps: the night's planned length.
        completed: ``False`` when ``should_stop`` woke the model early (call ``sleep`` again).
        loss_first: replay loss of the night's first step; loss_last: of its last step.
        fisher_samples: per-sample gradients in tonight's Fisher.
        pruned: weights pruned tonight; sparsity: fraction of prunable weights now zero.
        strengthened: weights scaled up tonight.
        seconds: wall time of this call.
        aborted: ``None``, or why the night was abandoned (a non-finite loss, gradient, weight
            or Fisher). The weights are then restored to where this call started, nothing is
            pruned or anchored, and the next ``sleep`` call starts a new night.
        fisher_method: how the per-sample gradients were computed
            (:meth:`edge_sleep.fisher.FisherPlan.describe`); empty when no Fisher step ran.
        fisher_planned_mb: the plan's estimate of their extra memory (with a
            ``memory_budget_mb``; else ``None``).
        fisher_peak_mb: the largest growth of the resident set measured during one Fisher
            step (:class:`edge_sleep.memory.ResidentPeak`; ``None`` where Linux's counters are
            not available).
        replay_stopped: ``None``, or why the night stopped replaying before its planned length
            (``SleepConfig.probe_records``): its remaining steps only measured the Fisher.
        probe_loss_first / probe_loss_best: the held-out probe's replay loss before the night's
            first step and the lowest seen (``None`` without a probe).
        replay_steps: steps of this call that changed the weights (the others only measured).
    """

    steps: int
    total_steps: int
    completed: bool
    loss_first: float | None
    loss_last: float | None
    fisher_samples: int
    pruned: int
    sparsity: float
    strengthened: int
    seconds: float
    aborted: str | None = None
    fisher_method: str = ""
    fisher_planned_mb: float | None = None
    fisher_peak_mb: float | None = None
    replay_stopped: str | None = None
    probe_loss_first: float | None = None
    probe_loss_best: float | None = None
    replay_steps: int | None = None


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the masked weights that are pruned (0.0 with no masks)."""
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in masks.values()) / total


@torch.no_grad()
def apply_masks_(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every pruned weight in place (pruned weights stay zero)."""
    for n, m in masks.items():
        weights[n].mul_(m)


@torch.no_grad()
def consolidate_weights_(
    weights: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    config: SleepConfig,
) -> tuple[int, int]:
    """Phase 2 on each weight matrix: significance, exact O(n) thresholds, prune and strengthen.

    Updates ``weights`` and ``masks`` in place through the fused kernel
    (:func:`edge_sleep.kernels.consolidate_`). Returns ``(pruned, strengthened)`` counts.
    """
    pruned = strengthened = 0
    for n, w in weights.items():
        mask = masks.setdefault(n, torch.ones_like(w, dtype=torch.bool))
        k = prune_count(w.numel(), int(w.numel() - mask.sum()), config.prune_frac, config.sparsity_cap)
        q = int(config.strengthen_frac * w.numel())
        rank = w.numel() - q if q > 0 and config.strengthen_eta > 0 else None
        done = consolidate_(w, fisher[n].to(w.dtype).contiguous(), mask, prune=k, strengthen_rank=rank,
                            eta=config.strengthen_eta)
        pruned += done.pruned
        strengthened += done.strengthened
    return pruned, strengthened


def run_sleep(
    night: Night,
    store: ReplayStore,
    config: SleepConfig,
    state: SleepState,
    *,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SleepReport:
    """Run (or resume) one night; see the module docstring.

    Args:
        night: what the night works on (the model, its base weights, masks, anchor, noise).
        store: the replay store to draw records from.
        config: the night's settings.
        state: progress; a fresh ``SleepState(total_steps)`` or one a preempted night left.
        should_stop: asked every ``check_every`` steps; ``True`` preempts the night.
        progress: called with the number of steps just run.

    Returns:
        A :class:`SleepReport`; when ``completed`` is ``False`` the caller keeps ``state``.
    """
    model, params, prunable, masks = night.model, night.params, night.prunable, night.masks
    anchor, replay_forward = night.anchor, night.replay_forward
    start = time.perf_counter()
    device = next((p.device for p in params.values()), torch.device("cpu"))
    # the weights this call starts from: a night that goes non-finite is undone to them
    start_weights = RestorePoint(params, config.restore_point, store.path)
    # setup: train the base weights, with noise on the hidden states
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    descend = _DescendInBackward(params, config.lr)
    noise = ConsolidationNoise(model, night.noise_layers, config.noise_std, night.generator)
    fisher_from = state.total_steps - config.fisher_steps
    loss_last = None
    steps_run = 0

    def fisher_loss(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return replay_loss(logits, y, t, config.label_weight, config.distill_weight)

    head = _Head(replay_forward, model)
    head_names = [f"model.{n}" for n in params]  # the same tensors, named through the wrapper
    use_vmap = True
    plan: FisherPlan | None = None
    peak_bytes: int | None = None
    replayed = 0
    num_classes: int | None = None  # the dreams' soft labels' width, from the first replayed batch
    if config.probe_records > 0 and state.probe_slots is None and state.step == 0:
        slots = store.slots()
        if len(slots) >= 2 * config.probe_records:  # the night's generator picks them; kept for a resumed night
            pick = torch.randperm(len(slots), generator=night.generator)[:config.probe_records].numpy()
            state.probe_slots = sorted(int(v) for v in slots[pick])
    if state.probe_slots:  # a resumed night: records deleted meanwhile (forget) leave the probe
        state.probe_slots = [v for v in state.probe_slots if v in set(store.slots().tolist())]
    probe = None if not state.probe_slots else store.read(np.asarray(state.probe_slots)).to(device)
    exclude = None if not state.probe_slots else np.asarray(state.probe_slots, dtype=np.int64)

    def look_at_probe() -> None:
        """The probe's loss now; replay stops when it has not improved for ``probe_patience`` looks."""
        assert probe is not None
        noise.enabled = False
        with torch.no_grad():
            value = float(replay_loss(replay_forward(probe.x), probe.y, probe.logits, config.label_weight,
                                      config.distill_weight))
        noise.enabled = True
        if state.probe_first is None:
            state.probe_first = value
        if state.probe_best is None or value < state.probe_best - PROBE_MIN_GAIN * abs(state.probe_best):
            state.probe_best, state.probe_bad = value, 0
        else:
            state.probe_bad += 1
            if state.probe_bad >= config.probe_patience:
                state.replay_stopped = (f"the probe's loss ({len(probe.y)} held-out records) did not improve for "
                                        f"{state.probe_bad} looks: {value:.4f} at step {state.step}, best "
                                        f"{state.probe_best:.4f}, {state.probe_first:.4f} before the night")

    try:
        # Phase 1: replay with consolidation noise, accumulating the Fisher at the end
        while state.step < state.total_steps:
            if probe is not None and state.replay_stopped is None and state.step % config.probe_every == 0 \
                    and state.step < fisher_from:
                look_at_probe()
                if state.replay_stopped is not None:  # only the Fisher's steps remain, and they only measure
                    state.step = max(state.step, fisher_from)
                    if state.step >= state.total_steps:
                        break
            batch = store.sample(config.batch_size, exclude=exclude).to(device)
            if plan is None:  # before the first step, so a budget too small refuses with nothing changed
                noise.enabled = False
                plan = _plan(head, head_names, (batch.x, batch.y, batch.logits), fisher_loss, config)
                noise.enabled = True
            measuring_only = state.replay_stopped is not None
            if measuring_only:
                with torch.no_grad():
                    loss = replay_loss(replay_forward(batch.x), batch.y, batch.logits, config.label_weight,
                                       config.distill_weight)
            elif config.dream_fraction > 0:  # a share of the batch replaced by blends of two records
                if num_classes is None:
                    with torch.no_grad():
                        num_classes = int(replay_forward(batch.x[:1]).shape[-1])
                dx, probs, dt = mix_records(batch.x, batch.y, batch.logits, config.dream_fraction, num_classes,
                                            night.generator)
                loss = replay_loss(replay_forward(dx), probs, dt, config.label_weight, config.distill_weight)
            else:
                logits = replay_forward(batch.x)
                loss = replay_loss(logits, batch.y, batch.logits, config.label_weight, config.distill_weight)
            loss_last = loss.item()
            problem = None if math.isfinite(loss_last) else f"non-finite replay loss ({loss_last})"
            if problem is None and not measuring_only:
                with descend:  # SGD, each weight stepped as soon as backward has its gradient
                    loss.backward()
                if not descend.finite:
                    problem = "non-finite gradient"
            if problem is None and not measuring_only:
                apply_masks_(params, masks)
                if not all_finite(list(params.values())):
                    problem = "non-finite weights after a step"
                replayed += 1
            if problem is not None:
                return _abort(params, start_weights, state, steps_run, masks, start,
                              f"{problem} at replay step {state.step + 1} of {state.total_steps}")
            if state.loss_first is None:
                state.loss_first = loss_last
            if state.step >= fisher_from:
                noise.enabled = False
                k = min(config.fisher_batch, batch.y.shape[0])
                fb = (batch.x[:k], batch.y[:k], None if batch.logits is None else batch.logits[:k])
                assert plan is not None
                sums = None
                with ResidentPeak() as peak:
                    if plan.method == "streamed":
                        for n in params:
                            if n not in state.fisher_sums:
                                state.fisher_sums[n] = torch.zeros_like(params[n], dtype=torch.float32)
                        buffers = {f"model.{n}": state.fisher_sums[n] for n in params}
                        # accumulates into the night's sums in place; checked below like the others
                        sums = fisher_sums_streamed(head, head_names, *fb, fisher_loss, sums=buffers)
                        accumulated = True
                    else:
                        accumulated = False
                        if use_vmap:
                            try:
                                sums = fisher_sums(head, head_names, *fb, fisher_loss, chunk=plan.chunk,
                                                   groups=plan.groups)
                            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                                # a model torch.func cannot trace: the plain per-sample loop is exact, slower
                                warnings.warn(f"per-sample gradients by torch.func failed ({type(e).__name__}: "
                                              f"{str(e)[:200]}); using the exact per-sample loop tonight",
                                              RuntimeWarning, stacklevel=2)
                                use_vmap = False
                        if sums is None:
                            sums = fisher_sums_loop(head, head_names, *fb, fisher_loss)
                if peak.extra_bytes is not None:
                    peak_bytes = max(peak_bytes or 0, peak.extra_bytes)
                if not elements_finite(list(sums.values())):  # a large finite Fisher is a Fisher
                    return _abort(params, start_weights, state, steps_run, masks, start,
                                  f"non-finite Fisher at replay step {state.step + 1} of {state.total_steps}")
                if not accumulated:
                    for hn, s in sums.items():
                        n = hn[len("model."):]
                        if n in state.fisher_sums:
                            state.fisher_sums[n].add_(s)
                        else:
                            state.fisher_sums[n] = s
                state.fisher_count += k
                noise.enabled = True
            state.step += 1
            steps_run += 1
            if progress is not None:
                progress(1)
            if should_stop is not None and state.step % config.check_every == 0 \
                    and state.step < state.total_steps and should_stop():
                return SleepReport(steps_run, state.total_steps, False, state.loss_first, loss_last,
                                   state.fisher_count, 0, mask_sparsity(masks), 0,
                                   time.perf_counter() - start, None, *_fisher_info(plan, peak_bytes, config),
                                   state.replay_stopped, state.probe_first, state.probe_best, replayed)
    finally:
        start_weights.close()
        noise.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(grad_before[n])

    # Phase 2: significance, prune and strengthen
    pruned = strengthened = 0
    if state.fisher_count > 0:
        fisher = state.fisher_sums  # averaged in place: no second model-sized copy
        for s in fisher.values():
            s.div_(state.fisher_count)
        weights = {n: params[n].data for n in prunable}
        pruned, strengthened = consolidate_weights_(weights, fisher, masks, config)
        # Protect: the next wake is anchored to tonight's weights, weighted by F
        if anchor is not None:  # the reference is what the penalty compares: the effective weights
            anchor.update_(fisher, {n: w.detach() for n, w in effective_weights(model, list(params)).items()})
    return SleepReport(steps_run, state.total_steps, True, state.loss_first, loss_last,
                       state.fisher_count, pruned, mask_sparsity(masks), strengthened,
                       time.perf_counter() - start, None, *_fisher_info(plan, peak_bytes, config),
                       state.replay_stopped, state.probe_first, state.probe_best, replayed)


class _DescendInBackward:
    """Phase 1's plain SGD step, taken inside backward: each weight moves by ``-lr * g`` as soon as
    its gradient ``g`` is accumulated, and the gradient is dropped. The same update as
    ``torch.optim.SGD`` after backward, without ever holding a model's worth of gradients (one of
    the night's model-sized copies). ``with descend: loss.backward()``; afterwards ``finite``
    says whether every gradient was finite (a weight whose gradient was not is left as it was,
    and the night is abandoned and restored anyway)."""

    def __init__(self, params: Mapping[str, nn.Parameter], lr: float) -> None:
        self.params, self.lr, self.finite = params, lr, True
        self._hooks: list[Any] = []

    def _step(self, p: torch.Tensor) -> None:
        g, p.grad = p.grad, None
        if g is None:
            return
        if not all_finite([g]):
            self.finite = False
            return
        with torch.no_grad():
            p.add_(g, alpha=-self.lr)

    def __enter__(self) -> _DescendInBackward:
        self.finite = True
        for p in self.params.values():
            p.grad = None  # what the day's step left there is not tonight's gradient
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in self.params.values()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class RestorePoint:
    """The weights a night starts from, kept in memory or in a file beside the replay store.

    Args:
        params: the weights (their values now are what :meth:`restore_` brings back).
        where: ``"memory"`` (a copy) or ``"disk"`` (``<store>.restore.pt``; the store has one
            writer, so the name is its own; a file left by a killed night is overwritten by the
            next). For a store in memory the file goes to the system's temporary folder.
        store_path: the replay store's file.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], where: str, store_path: Path) -> None:
        self._weights: dict[str, torch.Tensor] | None = None
        self._file: Path | None = None
        if where == "memory":
            self._weights = {n: p.detach().clone() for n, p in params.items()}
            return
        if str(store_path) == ":memory:":
            fd, name = tempfile.mkstemp(prefix="edge-sleep-", suffix=".restore.pt")
            os.close(fd)
            self._file = Path(name)
        else:
            self._file = store_path.with_name(store_path.name + ".restore.pt")
        try:
            # read back only by this process, during this call: no need to survive a crash. Owner-only
            # like the store beside it: these weights were trained on the raw examples
            fd = os.open(self._file, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # a file a killed night left keeps its mode through O_CREAT
            with os.fdopen(fd, "wb") as f:
                torch.save({n: p.detach() for n, p in params.items()}, f)
        except OSError as e:
            self._file = None
            raise StoreError(f"the night could not write its restore point beside the store ({e}). Fix: free "
                             "disk space, or use SleepConfig(restore_point='memory').") from e

    @torch.no_grad()
    def restore_(self, params: Mapping[str, nn.Parameter]) -> None:
        """Put the weights back where the night started."""
        weights = self._weights
        if weights is None:
            assert self._file is not None
            weights = torch.load(self._file, map_location="cpu", mmap=True, weights_only=True)
        for n, p in params.items():
            p.copy_(weights[n])

    def close(self) -> None:
        """Drop the copy (delete the file)."""
        self._weights = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None


@torch.no_grad()
def _abort(params: dict[str, torch.nn.Parameter], start_weights: RestorePoint, state: SleepState,
           steps_run: int, masks: Mapping[str, torch.Tensor], start: float, reason: str) -> SleepReport:
    """Undo this call's steps and report the night as abandoned."""
    start_weights.restore_(params)
    return SleepReport(steps_run, state.total_steps, False, state.loss_first, None, state.fisher_count, 0,
                       mask_sparsity(masks), 0, time.perf_counter() - start, aborted=reason)


class _Head(nn.Module):
    """Wraps ``replay_forward`` as a module whose parameters are ``model``'s (for torch.func)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _plan(head: nn.Module, names: list[str], batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
          loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
          config: SleepConfig) -> FisherPlan:
    """The night's Fisher plan; with a memory budget, one sample's activations are measured first."""
    params = dict(head.named_parameters())
    sizes = [params[n].numel() * 4 for n in names]
    if config.memory_budget_mb is None:
        return plan_fisher(sizes, 0, chunk=config.fisher_chunk, groups=config.fisher_param_groups,
                           budget_bytes=None)
    x, y, t = batch
    exclude = {p.untyped_storage().data_ptr() for p in params.values()}
    act = saved_activation_bytes(lambda: loss(head(x[:1]), y[:1], None if t is None else t[:1]), exclude)
    try:
        return plan_fisher(sizes, act, chunk=config.fisher_chunk, groups=config.fisher_param_groups,
                           budget_bytes=int(config.memory_budget_mb * 2**20))
    except ValueError as e:
        raise ConfigError("SleepConfig", [f"memory_budget_mb={config.memory_budget_mb!r}: {e}. Fix: raise "
                                          "the budget, or sleep a smaller set of weights"]) from e


def _fisher_info(plan: FisherPlan | None, peak_bytes: int | None,
                 config: SleepConfig) -> tuple[str, float | None, float | None]:
    """The report's ``fisher_method``, ``fisher_planned_mb`` and ``fisher_peak_mb``."""
    if plan is None or peak_bytes is None and config.fisher_steps == 0:
        return "", None, None
    planned = None if config.memory_budget_mb is None else plan.planned_bytes / 2**20
    return plan.describe(), planned, None if peak_bytes is None else peak_bytes / 2**20
