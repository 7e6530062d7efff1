"""Frozen configuration dataclasses, validated once with every problem reported together."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from edge_sleep.errors import ConfigError

__all__ = ["WakeConfig", "SleepConfig", "StoreConfig", "PrivacyConfig", "config_from_dict"]


def _check(owner: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(owner, problems)


def _frac(problems: list[str], name: str, value: float, *, low_open: bool = False) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        interval = "(0, 1]" if low_open else "[0, 1]"
        problems.append(f"{name}={value!r}; expected a fraction in {interval}")


def _nonneg(problems: list[str], name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        problems.append(f"{name}={value!r}; expected a finite number >= 0")


def _pos(problems: list[str], name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        problems.append(f"{name}={value!r}; expected a finite number > 0")


def _posint(problems: list[str], name: str, value: int, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        problems.append(f"{name}={value!r}; expected an integer >= {low}")


@dataclass(frozen=True)
class WakeConfig:
    """How the model learns during the day.

    The defaults are the tuned values (``benchmarks/tune.py`` on P-MNIST's validation split): the
    learning rate and anchor strength of the adapters row (``ssr_adapters``: 0.4 and 3.0, clipped
    at norm 1.0), which every tuned row with a night shares (the anchor's 3.0) or nearly (the
    full-weight sleep-only row's 0.4; DER++'s full-weight day, unclipped, chose 0.2).

    Args:
        lr: SGD learning rate of the wake step.
        train: ``"adapters"`` trains LoRA adapters on a frozen base (the on-device default);
            ``"all"`` trains every parameter (small models, the P-MNIST protocol).
        lora_rank: rank ``r`` of each adapter.
        lora_alpha: adapter scale numerator; the update is ``(alpha / r) * B @ A``.
        replay_batch: records drawn from the store per wake step (0 turns wake replay off).
        replay_alpha: weight of the logit-distillation term on replayed records (DER++'s alpha).
        replay_beta: weight of the label term on replayed records (DER++'s beta).
        anchor_lambda: strength of the Fisher anchor (online EWC) that protects consolidated
            weights; ``lambda * F`` is capped at ``1 / (2 * lr)`` so a step never overshoots.
        store_every: write every ``store_every``-th batch to the replay store (1 = all).
        max_grad_norm: clip each wake step's gradient to this global L2 norm (``None``: off).
            Whatever it is, a step whose loss, gradient or weights go non-finite is undone.
    """

    lr: float = 0.4
    train: Literal["adapters", "all"] = "adapters"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    replay_batch: int = 128
    replay_alpha: float = 0.3
    replay_beta: float = 1.0
    anchor_lambda: float = 3.0
    store_every: int = 1
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        p: list[str] = []
        _pos(p, "lr", self.lr)
        if self.max_grad_norm is not None:
            _pos(p, "max_grad_norm", self.max_grad_norm)
        if self.train not in ("adapters", "all"):
            p.append(f"train={self.train!r}; expected 'adapters' or 'all'")
        _posint(p, "lora_rank", self.lora_rank)
        _pos(p, "lora_alpha", self.lora_alpha)
        _posint(p, "replay_batch", self.replay_batch, zero_ok=True)
        _nonneg(p, "replay_alpha", self.replay_alpha)
        _nonneg(p, "replay_beta", self.replay_beta)
        _nonneg(p, "anchor_lambda", self.anchor_lambda)
        _posint(p, "store_every", self.store_every)
        _check("WakeConfig", p)

    @property
    def replays(self) -> bool:
        """Whether a wake step replays stored records (a batch and a positive weight)."""
        return self.replay_batch > 0 and (self.replay_alpha > 0 or self.replay_beta > 0)


@dataclass(frozen=True)
class SleepConfig:
    """How a night of Synaptic Sleep Replay runs (design.md section 3).

    Args:
        steps_per_wake_step: sleep length as replay steps per wake step since the last sleep
            (1.0 is the 1:1 ratio measured best on P-MNIST; the seed paper used 10.0).
        min_steps: lower bound on a night's replay steps when anything was learned.
        lr: SGD learning rate during sleep (lower than wake: a high one wrecks old tasks).
        batch_size: records per replay step.
        noise_std: consolidation noise, std relative to each hooked activation's RMS.
        noise_layers: names of modules whose outputs get noise; ``None`` picks every
            activation module (ReLU, GELU, SiLU, ...) automatically; ``()`` turns noise off.
        label_weight: weight of cross-entropy on the stored labels.
        distill_weight: weight of the MSE to the stored logits (dark knowledge).
        fisher_steps: the Fisher is accumulated over the last ``fisher_steps`` replay steps.
        fisher_batch: samples per step that contribute per-sample gradients to the Fisher.
        fisher_chunk: micro-batch size of the per-sample gradient computation.
        fisher_param_groups: number of parameter groups the Fisher is computed over, one group
            at a time (bounds the extra memory to one group).
        memory_budget_mb: extra memory the Fisher's per-sample gradients may take (beyond the
            model and the Fisher's own sums). ``None``: use ``fisher_chunk`` and
            ``fisher_param_groups`` as given. Set, the night keeps them if their estimate fits
            and otherwise streams one sample and one tensor's gradient at a time
            (:func:`edge_sleep.fisher.plan_fisher`); below even that, ``sleep`` refuses before
            changing anything. The report says which was used and the peak measured.
        prune_frac: fraction ``p`` of each weight matrix's still-alive weights pruned per night.
            Off by default: on the P-MNIST benchmark pruning 1% a night (to 18% sparsity) cost
            accuracy (row ``ssr_prune``); turn it on for a smaller model.
        sparsity_cap: pruning stops once this fraction of a matrix is zero.
        strengthen_frac: fraction ``q`` of weights (the most significant) scaled up.
        strengthen_eta: those weights are multiplied by ``1 + eta`` (0: off, the measured best).
        anchor_decay: ``gamma`` of the online anchor ``F_anchor <- gamma F_anchor + F``.
        check_every: ask ``should_stop`` every this many steps (the preemption granularity).
        restore_point: where a night keeps the weights it started from, which it restores if it
            goes non-finite: ``"memory"`` (a model-sized copy in RAM for the night) or ``"disk"``
            (a file beside the replay store, ``<store>.restore.pt``, written once when the night
            starts, read only if it is abandoned, deleted when it ends: the copy's RAM saved for
            one write of the weights).
        probe_records: records of the store held out of replay as a probe (``0``: off, the
            default until measured). The night measures the probe's replay loss (without noise)
            before its first step and every ``probe_every`` steps; when it has not improved (by more
            than 0.01% of its best, ``edge_sleep.sleep.PROBE_MIN_GAIN``) for
            ``probe_patience`` looks, the night stops replaying: its remaining Fisher steps only
            measure, and ``SleepReport.replay_stopped`` says why. A store with fewer than twice
            ``probe_records`` records is not probed.
        probe_every: replay steps between two looks at the probe.
        probe_patience: looks without improvement before replay stops.
        dream_fraction: share of each replay batch replaced by dreams, pairs of records blended
            (:func:`edge_sleep.mixup.mix_records`: latents, stored logits and labels mixed at a
            weight uniform in [0, 1]); ``0``: off, the default until a benchmark says otherwise.
            Needs floating-point records (not token ids). The Fisher and the probe see the
            records themselves. Torch nights only: ``night.pte`` replays the records it is given.
        consolidate: which base weights a night trains, measures the Fisher of, anchors and
            prunes. ``"all"``: every one. ``"adapted"`` (needs ``WakeConfig(train="adapters")``):
            only the weights and biases of the layers that carry adapters, plus PEFT's
            ``modules_to_save``, the weights a day can change. The rest (embeddings, norms) stays
            as it was handed over, and the anchor keeps a Fisher and a reference of those weights
            only (on MiniLM's first two layers with adapters on every linear layer: 3.7M weights
            instead of 15.6M). A night step costs about the same either way: its backward pass
            runs through the whole model.
    """

    steps_per_wake_step: float = 1.0
    min_steps: int = 50
    lr: float = 0.03
    batch_size: int = 128
    noise_std: float = 0.1
    noise_layers: tuple[str, ...] | None = None
    label_weight: float = 1.0
    distill_weight: float = 1.0
    fisher_steps: int = 200
    fisher_batch: int = 32
    fisher_chunk: int = 32
    fisher_param_groups: int = 1
    memory_budget_mb: float | None = None
    prune_frac: float = 0.0
    sparsity_cap: float = 0.2
    strengthen_frac: float = 0.01
    strengthen_eta: float = 0.0
    anchor_decay: float = 0.9
    check_every: int = 25
    restore_point: Literal["memory", "disk"] = "memory"
    probe_records: int = 0
    probe_every: int = 25
    probe_patience: int = 2
    dream_fraction: float = 0.0
    consolidate: Literal["all", "adapted"] = "all"

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.consolidate not in ("all", "adapted"):
            p.append(f"consolidate={self.consolidate!r}; expected 'all' or 'adapted'")
        _posint(p, "probe_records", self.probe_records, zero_ok=True)
        _posint(p, "probe_every", self.probe_every)
        _posint(p, "probe_patience", self.probe_patience)
        _frac(p, "dream_fraction", self.dream_fraction)
        _nonneg(p, "steps_per_wake_step", self.steps_per_wake_step)
        _posint(p, "min_steps", self.min_steps, zero_ok=True)
        _pos(p, "lr", self.lr)
        _posint(p, "batch_size", self.batch_size)
        _nonneg(p, "noise_std", self.noise_std)
        if self.noise_layers is not None:
            if not isinstance(self.noise_layers, tuple) or not all(
                isinstance(n, str) for n in self.noise_layers
            ):
                p.append(f"noise_layers={self.noise_layers!r}; expected None or a tuple of names")
        _nonneg(p, "label_weight", self.label_weight)
        _nonneg(p, "distill_weight", self.distill_weight)
        _posint(p, "fisher_steps", self.fisher_steps, zero_ok=True)
        _posint(p, "fisher_batch", self.fisher_batch)
        _posint(p, "fisher_chunk", self.fisher_chunk)
        _posint(p, "fisher_param_groups", self.fisher_param_groups)
        if self.memory_budget_mb is not None:
            _pos(p, "memory_budget_mb", self.memory_budget_mb)
        _frac(p, "prune_frac", self.prune_frac)
        _frac(p, "sparsity_cap", self.sparsity_cap)
        if self.sparsity_cap >= 1.0:
            p.append(f"sparsity_cap={self.sparsity_cap!r}; expected < 1 (a matrix of zeros)")
        _frac(p, "strengthen_frac", self.strengthen_frac)
        _nonneg(p, "strengthen_eta", self.strengthen_eta)
        _frac(p, "anchor_decay", self.anchor_decay)
        _posint(p, "check_every", self.check_every)
        if self.restore_point not in ("memory", "disk"):
            p.append(f"restore_point={self.restore_point!r}; expected 'memory' or 'disk'")
        _check("SleepConfig", p)


@dataclass(frozen=True)
class StoreConfig:
    """Where and how the replay store keeps records.

    Args:
        capacity_mb: byte budget of the store's files on disk, open or closed (the database, its
            write-ahead log and index; :mod:`edge_sleep.store.budget`).
        capacity_records: optional cap on the record count as well (the P-MNIST protocol's 500).
        eviction: ``"reservoir"`` (uniform over the stream) or ``"class_balanced"``.
        store_logits: also keep the logits the model gave when the record was written (fp16).
        latent_layer: ``None`` stores the input; the name of a child of an ``nn.Sequential``
            model stores that child's output instead (latent replay).
    """

    capacity_mb: float = 16.0
    capacity_records: int | None = None
    eviction: Literal["reservoir", "class_balanced"] = "reservoir"
    store_logits: bool = True
    latent_layer: str | None = None

    def __post_init__(self) -> None:
        p: list[str] = []
        _pos(p, "capacity_mb", self.capacity_mb)
        if self.capacity_records is not None:
            _posint(p, "capacity_records", self.capacity_records)
        if self.eviction not in ("reservoir", "class_balanced"):
            p.append(f"eviction={self.eviction!r}; expected 'reservoir' or 'class_balanced'")
        _check("StoreConfig", p)


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of what the replay store keeps (design.md section 4): per record, or
    per class through released statistics.

    ``design="record"`` (the default): each stored latent is clipped to L2 norm ``max_norm`` and gets Gaussian noise calibrated by
    the analytic Gaussian mechanism to ``(epsilon, delta)`` for that record (sensitivity
    ``2 * max_norm``: one example replaced by any other), then is projected back onto the ball of
    radius ``max_norm``; the stored logits are the model's output on the noised latent (both
    post-processing). Labels optionally go through k-ary randomized
    response (``label_epsilon``-DP). See :mod:`edge_sleep.privacy`.

    ``design="stats"``: nothing of a single example is stored. The day's latents, clipped to
    ``max_norm``, are summed per (stream, class) in memory; at the start of each night the counts,
    sums and second moments are released once, ``(epsilon, delta)``-DP for each example and its
    label, and the store receives "dreams" drawn from each class's mean and rank-``rank``
    covariance, with their logits from the start-of-night weights. See :mod:`edge_sleep.dreams`.

    Args:
        epsilon: the privacy loss of a stored latent (``"record"``) or of one night's release
            (``"stats"``); ``None`` stores latents as they are.
        delta: the mechanism's failure probability (keep it below 1 / the records ever stored).
        max_norm: the clipping norm ``C``, in the latent's units (choose it near a typical
            latent's norm: smaller clips the signal, larger needs more noise).
        label_epsilon: randomized response on labels; ``None`` stores labels as they are.
        noise_seed: ``None`` draws noise from ``os.urandom``; an int seeds a generator instead
            (repeatable, so not private: for tests; it warns).
        design: ``"record"`` or ``"stats"`` (needs ``epsilon``; labels are inside its guarantee,
            so no ``label_epsilon``).
        rank: ``"stats"`` only: the rank of each class's covariance the dreams are drawn from.
    """

    epsilon: float | None = None
    delta: float = 1e-5
    max_norm: float = 1.0
    label_epsilon: float | None = None
    noise_seed: int | None = None
    design: Literal["record", "stats"] = "record"
    rank: int = 16

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("epsilon", "label_epsilon"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                p.append(f"{name}={v!r}; expected None or a finite number > 0")
        if not 0 < self.delta < 1:
            p.append(f"delta={self.delta}; expected 0 < delta < 1 (below 1 / the records ever stored)")
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            p.append(f"max_norm={self.max_norm}; expected a finite number > 0 (near a typical latent's L2 norm)")
        if self.design not in ("record", "stats"):
            p.append(f"design={self.design!r}; expected 'record' (noise per stored example) or 'stats' "
                     "(released class statistics and dreams)")
        _posint(p, "rank", self.rank)
        if self.design == "stats" and self.epsilon is None:
            p.append("design='stats' with epsilon=None; expected an epsilon for the nightly release. "
                     "Fix: PrivacyConfig(design='stats', epsilon=8.0)")
        if self.design == "stats" and self.label_epsilon is not None:
            p.append(f"label_epsilon={self.label_epsilon} with design='stats'; the released statistics already "
                     "cover each example's label. Fix: label_epsilon=None")
        _check("PrivacyConfig", p)

    @property
    def enabled(self) -> bool:
        """Whether anything is privatized."""
        return self.epsilon is not None or self.label_epsilon is not None


def config_from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``dataclasses.asdict`` output (lists become tuples).

    Raises:
        ConfigError: if ``data`` has keys the config does not know.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(cls.__name__, [f"unknown key {k!r}; known: {sorted(names)}" for k in unknown])
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**fixed)

