"""Flower's apps around an :class:`edge_sleep.EdgeSleep` runtime: each phone a ``ClientApp``,
the fleet a ``ServerApp`` whose strategy (:class:`FleetStrategy`) refuses a malformed update and
averages the rest.

A round, on each client: open the node's runtime (its replay store and anchor stay on the node,
between rounds), take the fleet's weights into it, learn a day from the node's own data, sleep
(unless ``ClientSetup.nights`` is off), save, and send what the round changed in the form the
server's config asks for (:mod:`edge_sleep.fleet.payload`: full weights, their change, or the
change at the adapters' size; int8 or not; clipped under differential privacy), with the number of
examples learned. On the server, :class:`FleetStrategy` checks each reply (the model's fingerprint,
the format version, the round, the payload, shapes and finite values), logs and leaves out a bad
one, and averages the rest (Flower's FedAvg, or the Fisher-weighted mean). No data leaves a node;
only weights do.

:func:`fleet_strategy` builds the strategy, wrapped in Flower's
``DifferentialPrivacyClientSideFixedClipping`` when a :class:`~edge_sleep.fleet.privacy.FleetPrivacy`
is given.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Result, Strategy
from torch import nn

from edge_sleep.adapters import lora_modules
from edge_sleep.config import SleepConfig, StoreConfig, WakeConfig
from edge_sleep.fleet.aggregate import check_update, fisher_weighted_mean
from edge_sleep.fleet.payload import PAYLOADS, clip_, decode, encode, payload_bytes
from edge_sleep.fleet.privacy import FleetPrivacy, spent
from edge_sleep.runtime import EdgeSleep
from edge_sleep.wake import effective_weights

__all__ = ["FLEET_FORMAT_VERSION", "ClientSetup", "FleetStrategy", "NodeUnavailable", "adopt_fleet_weights_", "client_app",
           "fleet_of", "fleet_strategy", "fleet_weights", "log_usage", "privacy_spent",
           "server_app"]

FLEET_FORMAT_VERSION = 1  # what a node's reply holds and how (bumped when that changes)
_FISHER = "fisher/"  # the prefix of a node's anchor Fisher in its reply (merge="fisher")
_CLIP_KEY = "clipping_norm"  # Flower's key for the clip its DP wrappers send the nodes

log = logging.getLogger(__name__)


class NodeUnavailable(Exception):
    """Raised by a :attr:`ClientSetup.day` when its node will not take part in this round (its phone
    is off the charger, on a metered network...): the node keeps what it learned (it saves), tells
    the server it is absent, and the round goes on without it."""


@dataclass(frozen=True)
class ClientSetup:
    """What every node of a fleet shares.

    Attributes:
        folder: each node keeps its runtime under ``folder / f"node-{partition-id}"`` (its store,
            ``replay.db``, and its last save, ``ckpt/``).
        make_model: a fresh model of the fleet's architecture (a module-level function: Flower's
            simulation sends it to worker processes).
        day: ``day(es, node, server_round) -> examples``: teach the node's runtime its own data of
            that round (``es.learn`` calls); return how many examples it learned, or raise
            :class:`NodeUnavailable` to sit the round out.
        wake, sleep, store: the runtime's settings on every node.
        seed: the runtime's seed on node ``k`` is ``seed + k``.
        nights: sleep after each day (``False``: the fleet without nights, the control).
    """

    folder: Path
    make_model: Callable[[], nn.Module]
    day: Callable[[EdgeSleep, int, int], int]
    wake: WakeConfig = field(default_factory=WakeConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0
    nights: bool = True


def fleet_weights(es: EdgeSleep) -> dict[str, torch.Tensor]:
    """The weights a node computes with, by the names of its base weights (adapters not yet
    merged by a night are folded in): what the fleet averages."""
    return {n: w.detach().clone() for n, w in effective_weights(es.model, list(es.base_parameters)).items()}


@torch.no_grad()
def adopt_fleet_weights_(es: EdgeSleep, weights: dict[str, torch.Tensor]) -> None:
    """Take the fleet's base weights into ``es``, keeping its store and its anchor's Fisher.

    The node then computes the fleet's function: its adapters are emptied (``B = 0``). The
    anchor's reference moves to the new weights: the node protects the fleet's model where its own
    data says it matters. Checked first (:func:`check_update`); nothing changes on a refused update.

    Raises:
        ValueError: ``weights`` does not fit the runtime's base weights (the reasons named).
    """
    base = es.base_parameters
    problems = check_update(weights, {n: p.detach() for n, p in base.items()})
    if problems:
        raise ValueError(f"the fleet's weights do not fit this runtime: {'; '.join(problems)}")
    for n, p in base.items():
        p.copy_(weights[n].to(device=p.device, dtype=p.dtype))
    for module in lora_modules(es.model).values():
        module.lora_b.zero_()
    if es.anchor:
        es.anchor.reference.update(effective_weights(es.model, list(es.anchor.reference)))


def _open(setup: ClientSetup, node: int) -> tuple[EdgeSleep, Path]:
    """Node ``node``'s runtime (its last save, or a fresh one) and the folder it saves to."""
    folder = setup.folder / f"node-{node}"
    ckpt = folder / "ckpt"
    if (ckpt / "state.pt").exists():
        return EdgeSleep.load(ckpt, setup.make_model(), store=folder / "replay.db"), ckpt
    folder.mkdir(parents=True, exist_ok=True)
    return EdgeSleep(setup.make_model(), store=folder / "replay.db", store_config=setup.store, wake=setup.wake,
                     sleep=setup.sleep, seed=setup.seed + node), ckpt


def _round_config(config: ConfigRecord) -> dict[str, Any]:
    """The round's orders from the server, checked (a node refuses orders it cannot follow)."""
    want = {"server-round": int, "fingerprint": str, "format-version": int, "payload": str, "int8": bool,
            "rank": int, "merge": str}
    problems = [f"{k}={config.get(k)!r}; expected a {t.__name__}" for k, t in want.items()
                if not isinstance(config.get(k), t)]
    if problems:
        raise ValueError(f"the round's config: {'; '.join(problems)}. Fix: serve the fleet with fleet_strategy()")
    out: dict[str, Any] = {k: config[k] for k in want}
    out["clip"] = config.get(_CLIP_KEY)
    if config["format-version"] != FLEET_FORMAT_VERSION:
        raise ValueError(f"the server speaks fleet format {config['format-version']!r}; this node speaks "
                         f"{FLEET_FORMAT_VERSION}. Fix: the same edge-sleep version on server and nodes")
    return out


def log_usage(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as a JSON line to a node's log of what it did (``node-K/usage.jsonl``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _meta(es: EdgeSleep, orders: dict[str, Any]) -> ConfigRecord:
    """What a reply says of itself: the model, the format, the round and the payload."""
    return ConfigRecord({"fingerprint": es.fingerprint, "format-version": FLEET_FORMAT_VERSION,
                         "server-round": orders["server-round"], "payload": orders["payload"], "int8": orders["int8"]})


def client_app(setup: ClientSetup) -> ClientApp:
    """A ``ClientApp`` whose train step is one day (and one night) of the node's runtime."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = int(context.node_config["partition-id"])
        orders = _round_config(msg.content.config_records["config"])
        es, ckpt = _open(setup, node)
        try:
            if es.fingerprint != orders["fingerprint"]:
                raise ValueError(f"the fleet's model has fingerprint {orders['fingerprint']}; this node's "
                                 f"{es.fingerprint}. Fix: make_model must build the fleet's architecture")
            fleet = msg.content.array_records["arrays"].to_torch_state_dict()
            adopt_fleet_weights_(es, fleet)
            try:
                examples = setup.day(es, node, orders["server-round"])
            except NodeUnavailable as exc:
                es.save(ckpt)
                log.info("node %d sits round %d out: %s", node, orders["server-round"], exc)
                absent = MetricRecord({"num-examples": 0, "node": 1, "available": 0})
                return Message(content=RecordDict({"arrays": ArrayRecord(), "metrics": absent,
                                                   "fleet": _meta(es, orders)}), reply_to=msg)
            cpu = time.process_time()
            night_steps = es.sleep().steps if setup.nights and es.wake_steps_since_sleep else 0
            night_cpu = time.process_time() - cpu
            es.save(ckpt)
            sent, norm = encode(fleet_weights(es), fleet, payload=orders["payload"], rank=orders["rank"],
                                int8=orders["int8"], clip=orders["clip"])
            if orders["merge"] == "fisher":
                sent.update({_FISHER + n: f.detach().float().clone() for n, f in es.anchor.fisher.items()})
        finally:
            es.store.close()
        row = {"round": orders["server-round"], "num-examples": examples, "night-steps": night_steps,
               "night_cpu_s": night_cpu, "update-norm": norm, "bytes": payload_bytes(sent)}
        log_usage(ckpt.parent / "usage.jsonl", row)  # the node's own log of its rounds
        metrics = MetricRecord({"num-examples": examples, "node": 1, "available": 1, "night-steps": night_steps,
                                "update-norm": norm, "bytes": row["bytes"]})
        return Message(content=RecordDict({"arrays": ArrayRecord(sent), "metrics": metrics,
                                           "fleet": _meta(es, orders)}),
                       reply_to=msg)

    return app


class FleetStrategy(FedAvg):
    """Flower's FedAvg for an edge-sleep fleet: it tells the nodes what to send, reads every reply
    back into weights, refuses a malformed one and merges the rest.

    A reply is refused (logged with its node and reasons, kept in ``refused`` as
    ``(round, node id, reasons)``) when its model fingerprint, format version, round or payload
    differ from the round's, or its tensors do not decode to the fleet's shapes, or a value is not
    finite; the round goes on with the rest. Under differential privacy (``clip`` set) every
    decoded change is clipped again on the server, so no node moves the mean by more than ``clip``
    whatever it sends.

    Args:
        fingerprint: the fleet's model (:attr:`EdgeSleep.fingerprint` of its architecture).
        payload: what a node sends (:mod:`edge_sleep.fleet.payload`): ``"weights"``, ``"delta"``
            or ``"adapters"``.
        rank: the factors' rank of ``payload="adapters"``.
        int8: quantize what is sent to int8.
        merge: ``"fedavg"`` (by examples, or equally per node under privacy) or ``"fisher"`` (each
            weight by the nodes' anchor Fisher: :func:`~edge_sleep.fleet.aggregate.fisher_weighted_mean`;
            the nodes then also send their Fisher, counted in the bytes).
        clip: the norm each node's change is clipped to (set by :func:`fleet_strategy` under privacy).
        min_merged: a round with fewer good updates releases nothing (the fleet's model stays).
        **kwargs: Flower's FedAvg arguments (``fraction_train``, ``min_train_nodes``...).

    Attributes:
        refused: every reply left out.
        merged: ``{round: [node id of each update merged]}``, for the rounds that released a model.
        absent: ``(round, node id)`` of each node that sat a round out (:class:`NodeUnavailable`).
        silent: ``(round, node id)`` of each node sent the round that did not answer in time
            (``strategy.start(..., timeout=...)``), logged.
        bytes_sent: ``{round: [bytes of each merged reply]}``.
    """

    def __init__(self, *, fingerprint: str, payload: str = "weights", rank: int = 8, int8: bool = False,
                 merge: str = "fedavg", clip: float | None = None, min_merged: int = 1, **kwargs: Any) -> None:
        problems = []
        if isinstance(min_merged, bool) or not isinstance(min_merged, int) or min_merged < 1:
            problems.append(f"min_merged={min_merged!r}; expected an int >= 1")
        if payload not in PAYLOADS:
            problems.append(f"payload={payload!r}; expected one of {list(PAYLOADS)}")
        if merge not in ("fedavg", "fisher"):
            problems.append(f"merge={merge!r}; expected 'fedavg' or 'fisher'")
        if merge == "fisher" and clip is not None:
            problems.append("merge='fisher' weighs each node by its own Fisher, so one node's share is not bounded "
                            "by clip; expected merge='fedavg' under differential privacy")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"rank={rank!r}; expected an int >= 1")
        if not isinstance(fingerprint, str) or not fingerprint:
            problems.append(f"fingerprint={fingerprint!r}; expected the model's fingerprint (EdgeSleep.fingerprint)")
        if problems:
            raise ValueError("FleetStrategy: " + "; ".join(problems))
        kwargs.setdefault("weighted_by_key", "node" if clip is not None else "num-examples")
        super().__init__(**kwargs)
        self.fingerprint, self.payload, self.rank, self.int8, self.merge, self.clip = (
            fingerprint, payload, rank, int8, merge, clip)
        self.min_merged = min_merged
        self._global: dict[str, torch.Tensor] = {}
        self.refused: list[tuple[int, int, list[str]]] = []
        self.merged: dict[int, list[int]] = {}
        self.absent: list[tuple[int, int]] = []
        self.silent: list[tuple[int, int]] = []
        self._sampled: dict[int, list[int]] = {}
        self.bytes_sent: dict[int, list[int]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {n: t.float() for n, t in arrays.to_torch_state_dict().items()}
        config.update({"fingerprint": self.fingerprint, "format-version": FLEET_FORMAT_VERSION,
                       "payload": self.payload, "int8": self.int8, "rank": self.rank, "merge": self.merge})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def _read(self, server_round: int,
              reply: Message) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """A reply's weights, Fisher and bytes sent; ValueError with the reasons for a malformed one."""
        content = reply.content
        meta = content.config_records.get("fleet")
        if meta is None:
            raise ValueError("no 'fleet' record (model fingerprint, format version); expected edge-sleep's client_app")
        want = {"fingerprint": self.fingerprint, "format-version": FLEET_FORMAT_VERSION, "server-round": server_round,
                "payload": self.payload, "int8": self.int8}
        wrong = [f"{k} {meta.get(k)!r}, expected {v!r}" for k, v in want.items() if meta.get(k) != v]
        metrics = content.metric_records.get("metrics")
        examples = None if metrics is None else metrics.get("num-examples")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            wrong.append(f"num-examples {examples!r}, expected an int >= 0")
        if metrics is None or metrics.get("node") != 1:
            wrong.append(f"node {None if metrics is None else metrics.get('node')!r}, expected 1")
        if wrong:
            raise ValueError("; ".join(wrong))
        sent = content.array_records["arrays"].to_torch_state_dict()
        size = payload_bytes(sent)
        fisher = {k[len(_FISHER):]: sent.pop(k) for k in [k for k in sent if k.startswith(_FISHER)]}
        weights = decode(sent, self._global, payload=self.payload, rank=self.rank, int8=self.int8)
        problems = check_update(weights, self._global)
        if self.merge == "fisher":
            full = {n: fisher.get(n, torch.zeros_like(w)) for n, w in weights.items()}
            extra = sorted(set(fisher) - set(weights))
            problems += [f"Fisher of tensors the model does not have {extra}"] if extra else []
            problems += [f"Fisher {p}" for p in check_update(full, self._global)]
            problems += [f"Fisher of {n}: negative values" for n, f in full.items()
                         if f.shape == self._global[n].shape and bool((f < 0).any())]
            fisher = full
        if problems:
            raise ValueError("; ".join(problems))
        return weights, fisher, size

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, nodes, updates, fishers, counts, sizes = [], [], [], [], [], []
        replies = list(replies)
        answered = {reply.metadata.src_node_id for reply in replies}
        for node in self._sampled.pop(server_round, []):
            if node not in answered:
                log.warning("round %d: node %d did not answer in time; the round goes on without it", server_round, node)
                self.silent.append((server_round, node))
        for reply in replies:
            if reply.has_error():
                kept.append(reply)  # FedAvg logs and drops it
                continue
            said = reply.content.metric_records.get("metrics")
            if said is not None and said.get("available") == 0:
                self.absent.append((server_round, reply.metadata.src_node_id))
                continue
            try:
                weights, fisher, size = self._read(server_round, reply)
            except Exception as exc:  # a malformed reply: left out, never raised into the round
                node = reply.metadata.src_node_id
                reasons = [str(exc)]
                log.warning("round %d: refused the update of node %d: %s", server_round, node, reasons[0])
                self.refused.append((server_round, node, reasons))
                continue
            if self.clip is not None:
                change = {n: weights[n] - self._global[n] for n in weights}
                clip_(change, self.clip)
                weights = {n: self._global[n] + change[n] for n in weights}
            sizes.append(size)
            reported = reply.content.metric_records["metrics"]
            counts.append(float(reported["node" if self.clip is not None else "num-examples"]))  # type: ignore[arg-type]
            reply.content = RecordDict({"arrays": ArrayRecord(weights), "metrics": reported})
            kept.append(reply)
            nodes.append(reply.metadata.src_node_id)
            updates.append(weights)
            fishers.append(fisher)
        if len(updates) < self.min_merged:
            log.warning("round %d: %d good updates, fewer than min_merged=%d; the fleet's model stays", server_round,
                        len(updates), self.min_merged)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)
        if arrays is not None:
            self.merged[server_round] = nodes
            self.bytes_sent[server_round] = sizes
            if self.merge == "fisher":
                arrays = ArrayRecord(fisher_weighted_mean(updates, fishers, counts))
        return arrays, metrics


def fleet_strategy(*, fingerprint: str, privacy: FleetPrivacy | None = None, num_nodes: int | None = None,
                   **kwargs: Any) -> Strategy:
    """The fleet's strategy: a :class:`FleetStrategy`, and under ``privacy`` Flower's
    ``DifferentialPrivacyClientSideFixedClipping`` around it (the nodes clip their change to
    ``privacy.clip``, the server adds Gaussian noise of ``privacy.noise_multiplier * clip / n`` to
    the mean of ``n = num_nodes`` changes). :func:`privacy_spent` reads what it has spent.

    Raises:
        ValueError: ``privacy`` without ``num_nodes`` (the nodes sampled each round), and what
            :class:`FleetStrategy` refuses.
    """
    if privacy is None:
        return FleetStrategy(fingerprint=fingerprint, **kwargs)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes!r} with privacy; expected the number of nodes each round samples "
                         "(the noise is sized for their mean)")
    inner = FleetStrategy(fingerprint=fingerprint, clip=float(privacy.clip), **kwargs)
    return _FleetPrivacyWrapper(inner, privacy.noise_multiplier, float(privacy.clip), num_nodes)


class _FleetPrivacyWrapper(DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper, but a node that did not answer leaves the round going (Flower's skips the
    whole round): the mean is then over fewer nodes, and :func:`privacy_spent` counts the round
    with the noise multiplier that fewer nodes give."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        answered = []
        for reply in replies:
            if reply.has_error():
                log.info("round %d: node %d did not answer: %s", server_round, reply.metadata.src_node_id,
                         reply.error.reason)
            else:
                answered.append(reply)
        return super().aggregate_train(server_round, answered)


def privacy_spent(strategy: Strategy, delta: float) -> float | None:
    """The epsilon at ``delta`` a node's data has spent in the rounds ``strategy`` released
    (None for a strategy without privacy). A round merged from ``m`` of its ``n`` nodes counts
    with noise multiplier ``z * m / n`` (:mod:`edge_sleep.fleet.privacy`)."""
    if not isinstance(strategy, DifferentialPrivacyClientSideFixedClipping):
        return None
    inner = fleet_of(strategy)
    z, n = strategy.noise_multiplier, strategy.num_sampled_clients
    return spent([z * len(m) / n for m in inner.merged.values()], delta)


def fleet_of(strategy: Strategy) -> FleetStrategy:
    """The :class:`FleetStrategy` of a strategy :func:`fleet_strategy` made (itself, or the one
    inside the privacy wrapper): its ``merged``, ``bytes_sent`` and ``refused``."""
    inner = getattr(strategy, "strategy", strategy)
    if not isinstance(inner, FleetStrategy):
        raise ValueError(f"{type(strategy).__name__} around {type(inner).__name__}; expected a strategy made by "
                         "fleet_strategy()")
    return inner


def server_app(strategy: Strategy, initial: dict[str, torch.Tensor], *, rounds: int, timeout: float = 3600.0,
               evaluate: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
               on_result: Callable[[Result], None] | None = None) -> ServerApp:
    """The fleet's ``ServerApp``: ``rounds`` rounds of ``strategy`` (from :func:`fleet_strategy`)
    from the ``initial`` weights (:func:`fleet_weights` of a fresh runtime). A node that does not
    answer within ``timeout`` seconds is left out of its round. ``evaluate(round, arrays)`` scores
    the fleet's model after each round (and the initial one, round 0); ``on_result`` receives
    Flower's ``Result`` (the last model in ``result.arrays``) when the rounds are done.

    Raises:
        ValueError: ``rounds`` below 1 or ``timeout`` not a positive number.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r}; expected an int >= 1")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r}; expected seconds > 0")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds,
                                timeout=float(timeout), evaluate_fn=evaluate)
        if on_result is not None:
            on_result(result)

    return app
