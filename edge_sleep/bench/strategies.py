"""Continual-learning strategies, all run through the same :class:`EdgeSleep` runtime.

Each strategy is a :class:`Method`: wake settings, optional sleep settings, optional online EWC
at task boundaries. They share the model, the data stream, the int8 SQLite store and the
evaluation, so differences come from the method alone.

- ``naive``: fine-tuning, no replay, no protection.
- ``ewc``: online EWC (Schwarz et al. 2018): at each task end the exact per-sample diagonal
  Fisher on the task's data is folded into a decayed anchor (not squared batch gradients).
- ``er``: experience replay: each wake step adds CE on a batch drawn from the store.
- ``derpp``: DER++ (Buzzega et al. 2020): CE on new data + alpha MSE to stored logits + beta CE
  on stored labels, two independent store batches per step.
- ``ssr``: Synaptic Sleep Replay: DER++-style wake replay, Fisher anchor, and a night of noisy
  replay + prune/strengthen after each task.
- ``*_eq`` rows give a replay baseline extra buffer-only steps at each task end (no noise, no
  Fisher, no pruning) so its replay gradient steps equal SSR's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from edge_sleep.config import SleepConfig, WakeConfig
from edge_sleep.fisher import fisher_sums
from edge_sleep.runtime import EdgeSleep
from edge_sleep.wake import effective_weights

__all__ = ["Method", "default_methods", "ewc_consolidate", "buffer_only_sleep"]


@dataclass(frozen=True)
class Method:
    """A strategy: how to wake, whether and how to sleep, whether to run online EWC.

    Attributes:
        name: row name in the results.
        wake: wake settings (``train="all"`` on the P-MNIST protocol).
        sleep: sleep settings, or ``None`` for no sleep.
        ewc_samples: examples of each finished task used for the online-EWC Fisher (0: off).
        ewc_decay: online EWC's ``gamma``.
        seeds: how many of the benchmark's seeds this row runs (ablations run one).
    """

    name: str
    wake: WakeConfig
    sleep: SleepConfig | None = None
    ewc_samples: int = 0
    ewc_decay: float = 1.0
    seeds: int = 3
    notes: str = ""


def buffer_only_sleep(lr: float, label_weight: float, distill_weight: float) -> SleepConfig:
    """A 'sleep' that is plain replay on the store at the wake rate: no noise, Fisher or pruning."""
    return SleepConfig(steps_per_wake_step=1.0, min_steps=0, lr=lr, noise_std=0.0,
                       label_weight=label_weight, distill_weight=distill_weight, fisher_steps=0,
                       prune_frac=0.0, strengthen_eta=0.0, strengthen_frac=0.0)


def ewc_consolidate(es: EdgeSleep, x: torch.Tensor, y: torch.Tensor, decay: float) -> None:
    """Online EWC at a task boundary: per-sample Fisher of CE on ``(x, y)``, folded into the anchor."""
    names = list(es._sleep_params)

    def ce(logits: torch.Tensor, yi: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, yi)

    sums = fisher_sums(es.model, names, x, y, None, ce, chunk=256)
    fisher = {n: s / x.shape[0] for n, s in sums.items()}
    es.anchor.decay = decay
    es.anchor.update_(fisher, effective_weights(es.model, names))


def default_methods(hp: dict[str, dict[str, float]]) -> list[Method]:
    """The benchmark's rows, from tuned hyperparameters ``hp[method] = {lr, alpha, beta, lam}``."""
    def wake(name: str, **kw: Any) -> WakeConfig:
        return WakeConfig(train="all", lr=hp[name]["lr"], **kw)

    d, s = hp["derpp"], hp["ssr"]
    er_w = wake("er", replay_alpha=0.0, replay_beta=1.0, anchor_lambda=0.0)
    derpp_w = wake("derpp", replay_alpha=d["alpha"], replay_beta=d["beta"], anchor_lambda=0.0)
    ssr_w = wake("ssr", replay_alpha=s["alpha"], replay_beta=s["beta"], anchor_lambda=s["lam"])
    ssr_s = SleepConfig(steps_per_wake_step=1.0, min_steps=0, lr=s["sleep_lr"],
                        distill_weight=s["sleep_distill"], prune_frac=s["prune_frac"],
                        strengthen_eta=s["strengthen_eta"])
    methods = [
        Method("naive", wake("naive", replay_batch=0, anchor_lambda=0.0)),
        Method("ewc", wake("ewc", replay_batch=0, anchor_lambda=hp["ewc"]["lam"]), ewc_samples=1000,
               ewc_decay=hp["ewc"]["decay"]),
        Method("er", er_w),
        Method("er_eq", er_w, buffer_only_sleep(hp["er"]["lr"], 1.0, 0.0),
               notes="ER + buffer-only steps at each task end: equal replay steps to SSR"),
        Method("derpp", derpp_w),
        Method("derpp_eq", derpp_w, buffer_only_sleep(d["lr"], d["beta"], d["alpha"]),
               notes="DER++ + buffer-only steps at each task end: equal replay steps to SSR"),
        Method("ssr", ssr_w, ssr_s),
        Method("ssr_1to10", ssr_w, dataclasses.replace(ssr_s, steps_per_wake_step=10.0), seeds=1,
               notes="the seed paper's 1:10 wake:sleep ratio"),
        Method("ssr_no_noise", ssr_w, dataclasses.replace(ssr_s, noise_std=0.0), seeds=1),
        Method("ssr_prune", ssr_w, dataclasses.replace(ssr_s, prune_frac=0.01, strengthen_eta=0.01),
               notes="SSR with the consolidation kernel: prune 1% of alive weights a night (cap 20%), "
                     "strengthen the top 1% by 1%"),
        Method("ssr_no_anchor", dataclasses.replace(ssr_w, anchor_lambda=0.0), ssr_s, seeds=1),
        Method("ssr_no_wake_replay", dataclasses.replace(ssr_w, replay_batch=0), ssr_s, seeds=1),
    ]
    return methods
