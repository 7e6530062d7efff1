"""Flower's apps around an :class:`edge_sleep.EdgeSleep` runtime: each phone a ``ClientApp``,
the fleet a ``ServerApp`` whose strategy refuses a malformed update and averages the rest.

A round, on each client: open the node's runtime (its replay store and anchor stay on the node,
between rounds), take the fleet's weights into it, learn a day from the node's own data, sleep,
save, and send the base weights the night left (what a night trains and the anchor protects:
:attr:`EdgeSleep.base_parameters`) with the number of examples learned. On the server,
:class:`CheckedFedAvg` checks each update against the fleet's model
(:func:`edge_sleep.fleet.aggregate.check_update`), logs and leaves out a bad one, and averages the
rest by examples (Flower's FedAvg). No data leaves a node; only weights do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from edge_sleep.config import SleepConfig, StoreConfig, WakeConfig
from edge_sleep.fleet.aggregate import check_update
from edge_sleep.runtime import EdgeSleep
from edge_sleep.wake import effective_weights

__all__ = ["CheckedFedAvg", "ClientSetup", "adopt_fleet_weights_", "client_app", "fleet_weights"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSetup:
    """What every node of a fleet shares.

    Attributes:
        folder: each node keeps its runtime under ``folder / f"node-{partition-id}"`` (its store,
            ``replay.db``, and its last save, ``ckpt/``).
        make_model: a fresh model of the fleet's architecture (a module-level function: Flower's
            simulation sends it to worker processes).
        day: ``day(es, node, server_round) -> examples``: teach the node's runtime its own data of
            that round (``es.learn`` calls); return how many examples it learned.
        wake, sleep, store: the runtime's settings on every node.
        seed: the runtime's seed on node ``k`` is ``seed + k``.
    """

    folder: Path
    make_model: Callable[[], nn.Module]
    day: Callable[[EdgeSleep, int, int], int]
    wake: WakeConfig = field(default_factory=WakeConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    seed: int = 0


def fleet_weights(es: EdgeSleep) -> dict[str, torch.Tensor]:
    """The weights a node sends: its base weights as they stand (after a night, the adapters are
    merged into them)."""
    return {n: p.detach().clone() for n, p in es.base_parameters.items()}


@torch.no_grad()
def adopt_fleet_weights_(es: EdgeSleep, weights: dict[str, torch.Tensor]) -> None:
    """Take the fleet's base weights into ``es``, keeping its store and its anchor's Fisher.

    The anchor's reference moves to the new weights: the node then protects the fleet's model,
    where its own data says it matters. Checked first (:func:`check_update`); nothing changes on
    a refused update.

    Raises:
        ValueError: ``weights`` does not fit the runtime's base weights (the reasons named).
    """
    base = es.base_parameters
    problems = check_update(weights, {n: p.detach() for n, p in base.items()})
    if problems:
        raise ValueError(f"the fleet's weights do not fit this runtime: {'; '.join(problems)}")
    for n, p in base.items():
        p.copy_(weights[n].to(device=p.device, dtype=p.dtype))
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


def client_app(setup: ClientSetup) -> ClientApp:
    """A ``ClientApp`` whose train step is one day and one night of the node's runtime."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = int(context.node_config["partition-id"])
        server_round = msg.content.config_records["config"]["server-round"]
        if not isinstance(server_round, int):
            raise ValueError(f"the round's config holds server-round={server_round!r}; expected an int")
        es, ckpt = _open(setup, node)
        try:
            adopt_fleet_weights_(es, msg.content.array_records["arrays"].to_torch_state_dict())
            examples = setup.day(es, node, server_round)
            report = es.sleep()
            es.save(ckpt)
            content = RecordDict({"arrays": ArrayRecord(fleet_weights(es)),
                                  "metrics": MetricRecord({"num-examples": examples,
                                                           "night-steps": report.steps})})
        finally:
            es.store.close()
        return Message(content=content, reply_to=msg)

    return app


class CheckedFedAvg(FedAvg):
    """Flower's FedAvg that first checks every update against the fleet's model of the round:
    one with other tensors, other shapes or a non-finite value is logged (with its node and
    reasons) and left out, and the round goes on with the rest. ``refused`` keeps
    ``(round, node id, reasons)`` of every update left out."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._global: dict[str, torch.Tensor] = {}
        self.refused: list[tuple[int, int, list[str]]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = []
        for reply in replies:
            if reply.has_error():
                kept.append(reply)  # FedAvg logs and drops it
                continue
            try:
                problems = check_update(reply.content.array_records["arrays"].to_torch_state_dict(), self._global)
            except Exception as exc:  # a reply without arrays, or arrays that do not convert
                problems = [f"unreadable arrays: {exc}"]
            if problems:
                node = reply.metadata.src_node_id
                log.warning("round %d: refused the update of node %d: %s", server_round, node, "; ".join(problems))
                self.refused.append((server_round, node, problems))
            else:
                kept.append(reply)
        return super().aggregate_train(server_round, kept)
