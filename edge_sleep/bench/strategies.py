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
- ``derpp_ewc`` (control): tuned DER++ plus the online Fisher anchor SSR uses (same capped
  penalty), refreshed at each task end from the task's data: SSR's protection without a night.
- ``derpp_mammoth`` (peer): DER++ at Mammoth's published P-MNIST arguments (lr 0.2, alpha 1.0,
  beta 0.5, buffer 500), untuned: the peer's own configuration as a row.
- ``derpp_storefisher`` (control): tuned DER++ plus the anchor's Fisher measured on the replay
  store at each task end (the night's clean replay loss, CE + distillation) and no replay steps:
  what SSR's night adds to the anchor, without its replay.
- ``derpp_eq`` (control): tuned DER++ plus buffer-only replay at each task end, one step per wake
  step (no noise, no Fisher, no pruning), its learning rate and distillation weight tuned like
  SSR's night: replay compute without SSR's mechanisms (SSR's tuned night may run up to two steps
  per wake step, and its probe stops it early).
- ``ssr``: Synaptic Sleep Replay on top of DER++'s tuned wake: the Fisher anchor, and a night of
  noisy replay (and the Fisher it measures) after each task.
- ``ssr_sleep_only``: SSR with no replay while awake: the day costs what naive fine-tuning costs.
- ``ssr_adapters``: the on-device default path: a base first trained on task 0, then LoRA
  adapters (rank 8) by day, merged and consolidated by night.
- ``ssr_1to10``, ``ssr_no_noise``, ``ssr_no_anchor``, ``ssr_prune``, ``ssr_no_replay``, ``ssr_dreams``,
  ``ssr_no_probe``: one change each to ``ssr`` (``ssr_no_replay``: the night's replay steps removed, its Fisher measured
  on the store at each task end; ``ssr_no_probe``: no probe records held out, so no early stop);
  ``ssr_1to10_no_probe``: the 1:10 ratio without the probe (what a night that knows when to stop saves).

Hyperparameters come as ``hp[method]``; the controls and SSR add their own to DER++'s tuned
wake (``hp["derpp"]``), so each spends the same tuning budget on what it adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from edge_sleep.config import SleepConfig, WakeConfig
from edge_sleep.fisher import fisher_sums
from edge_sleep.modelio import logits_of
from edge_sleep.runtime import EdgeSleep
from edge_sleep.sleep import replay_loss
from edge_sleep.wake import effective_weights

__all__ = ["Method", "MAMMOTH_DERPP", "default_methods", "ewc_consolidate", "store_fisher_consolidate",
           "buffer_only_sleep", "ssr_sleep"]

# DER++'s best arguments for perm-mnist with a 500-record buffer in Mammoth's best_args
# (Buzzega et al. 2020's code): SGD lr 0.2, alpha 1.0, beta 0.5, batch and replay batch 128.
MAMMOTH_DERPP: dict[str, float] = {"lr": 0.2, "alpha": 1.0, "beta": 0.5}


@dataclass(frozen=True)
class Method:
    """A strategy: how to wake, whether and how to sleep, whether to run online EWC.

    Attributes:
        name: row name in the results.
        wake: wake settings (``train="all"`` on the P-MNIST protocol).
        sleep: sleep settings, or ``None`` for no sleep.
        ewc_samples: examples of each finished task used for the online-EWC Fisher (0: off).
        ewc_decay: online EWC's ``gamma`` (also the store Fisher's, with ``store_fisher``).
        store_fisher: at each task end, fold the Fisher measured on the replay store into the
            anchor (decay ``ewc_decay``) with no replay step (:func:`store_fisher_consolidate`).
        pretrain_lr: ``> 0``: first train the base on task 0 (plain SGD at this rate), as a
            model shipped pretrained to a phone; then run the whole stream.
        pretrain_passes: passes over task 0 for that base.
        notes: what the row isolates.
    """

    name: str
    wake: WakeConfig
    sleep: SleepConfig | None = None
    ewc_samples: int = 0
    ewc_decay: float = 1.0
    store_fisher: bool = False
    pretrain_lr: float = 0.0
    pretrain_passes: int = 1
    notes: str = ""


def buffer_only_sleep(lr: float, distill_weight: float, steps_per_wake_step: float = 1.0) -> SleepConfig:
    """A 'night' that is plain replay on the store: no noise, no Fisher, no pruning."""
    return SleepConfig(steps_per_wake_step=steps_per_wake_step, min_steps=0, lr=lr, noise_std=0.0,
                       label_weight=1.0, distill_weight=distill_weight, fisher_steps=0,
                       prune_frac=0.0, strengthen_eta=0.0, strengthen_frac=0.0)


def ssr_sleep(hp: dict[str, float]) -> SleepConfig:
    """SSR's night from its hyperparameters (``sleep_lr``; optional ``sleep_distill``, ``ratio``,
    the anchor's ``decay`` and ``probe`` records, which default to ``SleepConfig``'s)."""
    return SleepConfig(steps_per_wake_step=hp.get("ratio", 1.0), min_steps=0, lr=hp["sleep_lr"],
                       distill_weight=hp.get("sleep_distill", 1.0), prune_frac=0.0, strengthen_eta=0.0,
                       anchor_decay=hp.get("decay", SleepConfig.anchor_decay),
                       probe_records=int(hp.get("probe", SleepConfig.probe_records)))


def ewc_consolidate(es: EdgeSleep, x: torch.Tensor, y: torch.Tensor, decay: float) -> None:
    """Online EWC at a task boundary: per-sample Fisher of CE on ``(x, y)``, folded into the anchor."""
    names = list(es.base_parameters)

    def ce(logits: torch.Tensor, yi: torch.Tensor, _: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, yi)

    sums = fisher_sums(es.model, names, x.to(es.device), y.to(es.device), None, ce, chunk=256)
    _fold_fisher(es, {n: s / x.shape[0] for n, s in sums.items()}, decay)


def _fold_fisher(es: EdgeSleep, fisher: dict[str, torch.Tensor], decay: float) -> None:
    """Fold a mean Fisher ``{base weight name: tensor}`` into the anchor with ``decay``; the
    anchor's reference becomes the weights as they are."""
    es.anchor.decay = decay
    es.anchor.update_(fisher, effective_weights(es.model, list(fisher)))


def store_fisher_consolidate(es: EdgeSleep, decay: float, label_weight: float = 1.0,
                             distill_weight: float = 1.0) -> None:
    """The anchor's Fisher measured on the replay store, without a replay step.

    Every stored record's squared gradient of the night's clean replay loss (``label_weight`` CE on
    its label + ``distill_weight`` MSE to its stored logits), averaged and folded into the anchor
    with ``decay``: what a night contributes to the anchor, minus its replay.
    """
    batch = es.store.read(es.store.slots()).to(es.device)
    head, base = es.replay_head, es.base_parameters
    by_id = {id(p): n for n, p in base.items()}
    names = [n for n, p in head.named_parameters() if id(p) in by_id]

    def loss(logits: torch.Tensor, yi: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return replay_loss(logits_of(logits), yi, t, label_weight, distill_weight)

    sums = fisher_sums(head, names, batch.x, batch.y, batch.logits, loss, chunk=256)
    _fold_fisher(es, {by_id[id(p)]: sums[n] / batch.y.shape[0] for n, p in head.named_parameters() if n in sums},
                 decay)


def default_methods(hp: dict[str, dict[str, float]]) -> list[Method]:
    """The benchmark's rows, from tuned hyperparameters ``hp[method]``.

    ``hp`` keys: ``naive {lr}``, ``ewc {lr, lam, decay}``, ``er {lr, beta}``, ``derpp {lr, alpha,
    beta}``, ``derpp_ewc {lam, decay}``, ``derpp_storefisher {lam, decay}``, ``derpp_eq {sleep_lr,
    sleep_distill}``, ``ssr {lam, sleep_lr, sleep_distill, decay, ratio, probe}``, ``ssr_sleep_only {lr, lam, ratio, sleep_lr, sleep_distill}``,
    ``ssr_adapters {lr, lam, sleep_lr, sleep_distill}``. A missing key leaves its rows out; the
    rows after ``derpp`` need it; ``derpp_mammoth`` comes with it and takes no hyperparameter.
    """
    def wake(lr: float, **kw: Any) -> WakeConfig:
        # the standard P-MNIST protocol trains unclipped; the adapters rows keep the library default
        return WakeConfig(train="all", lr=lr, max_grad_norm=None, **kw)

    methods: list[Method] = []
    if "naive" in hp:
        methods.append(Method("naive", wake(hp["naive"]["lr"], replay_batch=0, anchor_lambda=0.0)))
    if "ewc" in hp:
        e = hp["ewc"]
        methods.append(Method("ewc", wake(e["lr"], replay_batch=0, anchor_lambda=e["lam"]), ewc_samples=1000,
                              ewc_decay=e["decay"]))
    if "er" in hp:
        methods.append(Method("er", wake(hp["er"]["lr"], replay_alpha=0.0, replay_beta=hp["er"]["beta"],
                                         anchor_lambda=0.0)))
    if "derpp" not in hp:
        return methods
    d = hp["derpp"]
    derpp_w = wake(d["lr"], replay_alpha=d["alpha"], replay_beta=d["beta"], anchor_lambda=0.0)
    methods.append(Method("derpp", derpp_w))
    m = MAMMOTH_DERPP
    methods.append(Method("derpp_mammoth", wake(m["lr"], replay_alpha=m["alpha"], replay_beta=m["beta"],
                                                anchor_lambda=0.0),
                          notes="DER++ at Mammoth's published P-MNIST arguments, untuned: the peer's row"))
    if "derpp_ewc" in hp:
        c = hp["derpp_ewc"]
        methods.append(Method("derpp_ewc", dataclasses.replace(derpp_w, anchor_lambda=c["lam"]),
                              ewc_samples=1000, ewc_decay=c["decay"],
                              notes="DER++ + SSR's Fisher anchor refreshed at each task end from the "
                                    "task's data: the protection without a night"))
    if "derpp_storefisher" in hp:
        c = hp["derpp_storefisher"]
        methods.append(Method("derpp_storefisher", dataclasses.replace(derpp_w, anchor_lambda=c["lam"]),
                              ewc_decay=c["decay"], store_fisher=True,
                              notes="DER++ + the anchor's Fisher measured on the store at each task end, "
                                    "no replay steps: SSR's anchor without its night's replay"))
    if "derpp_eq" in hp:
        c = hp["derpp_eq"]
        methods.append(Method("derpp_eq", derpp_w, buffer_only_sleep(c["sleep_lr"], c["sleep_distill"]),
                              notes="DER++ + buffer-only replay at each task end, one step per wake "
                                    "step, its lr and distillation weight tuned"))
    if "ssr_sleep_only" in hp:
        c = hp["ssr_sleep_only"]
        methods.append(Method("ssr_sleep_only", wake(c["lr"], replay_batch=0, anchor_lambda=c["lam"]),
                              ssr_sleep(c),
                              notes="no replay while awake: the day costs what naive fine-tuning costs"))
    if "ssr_adapters" in hp:
        c = hp["ssr_adapters"]
        methods.append(Method("ssr_adapters",
                              WakeConfig(train="adapters", lora_rank=8, lr=c["lr"], replay_alpha=d["alpha"],
                                         replay_beta=d["beta"], anchor_lambda=c["lam"]),
                              ssr_sleep(c), pretrain_lr=hp["naive"]["lr"] if "naive" in hp else 0.1,
                              notes="base first trained on task 0; LoRA rank 8 by day (DER++'s replay), "
                                    "merged and consolidated by night: the on-device default path"))
    if "ssr" not in hp:
        return methods
    s = hp["ssr"]
    ssr_w = dataclasses.replace(derpp_w, anchor_lambda=s["lam"])
    ssr_s = ssr_sleep(s)
    methods.insert(len(methods) - sum(m.name in ("ssr_sleep_only", "ssr_adapters") for m in methods),
                   Method("ssr", ssr_w, ssr_s, notes="DER++'s wake + Fisher anchor + a night after each task"))
    methods += [
        Method("ssr_1to10", ssr_w, dataclasses.replace(ssr_s, steps_per_wake_step=10.0),
               notes="the seed paper's 1:10 wake:sleep ratio (with SSR's probe, which stops a night that "
                     "stops helping)"),
        Method("ssr_no_noise", ssr_w, dataclasses.replace(ssr_s, noise_std=0.0),
               notes="no consolidation noise"),
        Method("ssr_no_anchor", dataclasses.replace(ssr_w, anchor_lambda=0.0), ssr_s,
               notes="no Fisher anchor during the day"),
        Method("ssr_prune", ssr_w, dataclasses.replace(ssr_s, prune_frac=0.01, strengthen_eta=0.01),
               notes="prune 1% of alive weights a night (cap 20%), strengthen the top 1% by 1%"),
        Method("ssr_no_replay", ssr_w, None, store_fisher=True, ewc_decay=ssr_s.anchor_decay,
               notes="no replay step at night: the anchor's Fisher measured on the store at each task end, "
                     "with SSR's strength and decay"),
        Method("ssr_dreams", ssr_w, dataclasses.replace(ssr_s, dream_fraction=0.5),
               notes="half of each night's batch replaced by dreams: pairs of records blended (mixup)"),
        Method("ssr_no_probe", ssr_w, dataclasses.replace(ssr_s, probe_records=0),
               notes="no probe: the night replays its whole length, whatever the held-out loss does"),
        Method("ssr_1to10_no_probe", ssr_w, dataclasses.replace(ssr_s, steps_per_wake_step=10.0, probe_records=0),
               notes="the 1:10 ratio without the probe: what the probe saves a long night"),
    ]
    return methods
