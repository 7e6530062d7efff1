"""A simulated fleet (``edge-sleep fleet simulate``): phones of one device profile, each with its own
stream of Permuted-MNIST tasks, learning by day, sleeping at night when their phone is on the
charger, and merging on Flower's simulation engine when enough of them are.

- **Streams.** Client ``k`` sees ``tasks_per_client`` of the ``tasks`` permutations, drawn for it
  (overlapping and non-identical across clients), in its own order, a task every
  ``rounds / tasks_per_client`` days; a day is ``examples_per_day`` images of its current task,
  its own slice of MNIST's training set.
- **Nights and rounds.** Day ``d`` of client ``k`` is drawn from the profile
  (:func:`edge_sleep.simulate.days.draw_days`, seed ``seed * 1000 + k``); the night after it is on
  the charger when the day's plan charges at 23:54. A client learns every day; it sleeps and joins
  that night's round only when charging (a phone off the charger answers the round with an error,
  as one whose app the OS does not start would, and Flower leaves it out). A round that merges fewer
  than ``min_fraction`` of the clients releases nothing.
- **Alone.** ``mode="alone"``: the same days and nights on each client, no rounds: the control.
- **Energy.** Each client's CPU seconds of days and nights, scaled to the profile's device by
  the reference workload (:mod:`edge_sleep.simulate.calibrate`), times ``power_active_w``. The
  radio's energy is not counted.
- **Report.** Per client: accuracy on all tasks and on the tasks it never saw, with the model it
  ends with (the fleet's last model in a fleet; its own alone), and its energy; per round: clients
  merged and bytes each sent.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from edge_sleep.bench.datasets import PermutedTask, permuted_mnist
from edge_sleep.config import SleepConfig, StoreConfig, WakeConfig
from edge_sleep.bench.pmnist import mlp
from edge_sleep.fleet.apps import NodeUnavailable, log_usage
from edge_sleep.runtime import EdgeSleep

__all__ = ["FleetSimulation", "charging_nights", "client_tasks", "simulate_fleet"]

_CHARGE_HOUR = 23.9  # the night after a day is on the charger when the day's plan charges then


@dataclass(frozen=True)
class FleetSimulation:
    """A simulated fleet.

    Attributes:
        clients: phones in the fleet.
        rounds: days, each ended by a round.
        tasks: Permuted-MNIST tasks in the pool; tasks_per_client: how many each client sees.
        examples_per_day: images a client learns a day; batch: images per wake step.
        train: what a day trains (``WakeConfig.train``): ``"all"`` the weights, or ``"adapters"``
            (on a randomly initialised MLP, adapters alone learn little: no pretrained base here).
        test_per_task: evaluation images per task (MNIST's test set).
        mode: ``"fleet"`` (rounds on Flower) or ``"alone"`` (each client by itself: the control).
        nights: sleep after each charging day (``False``: the fleet without nights).
        payload, int8, rank, merge: what a node sends and how the server merges
            (:class:`~edge_sleep.fleet.apps.FleetStrategy`).
        epsilon: differential privacy of each client's data over all rounds (``None``: none);
            delta (default ``1 / (10 * clients)``) and clip: its delta and the updates' clip norm.
        profile: the device profile every client runs on.
        min_fraction: a round merges only when at least this share of the clients are charging.
        seed: the tasks, the streams, the days, the models.
        hidden: the MLP's width (784-hidden-hidden-10).
        sleep_steps: replay steps of a night, at least (``SleepConfig.min_steps``).
    """

    clients: int = 4
    rounds: int = 3
    tasks: int = 20
    tasks_per_client: int = 5
    examples_per_day: int = 1024
    batch: int = 32
    train: Literal["all", "adapters"] = "all"
    test_per_task: int = 500
    mode: str = "fleet"
    nights: bool = True
    payload: str = "adapters"
    int8: bool = True
    rank: int = 8
    merge: str = "fedavg"
    epsilon: float | None = None
    delta: float | None = None
    clip: float = 1.0
    profile: str = "galaxy-s24"
    min_fraction: float = 0.5
    seed: int = 0
    hidden: int = 100
    sleep_steps: int = 20

    def __post_init__(self) -> None:
        ints = {"clients": 1, "rounds": 1, "tasks": 1, "tasks_per_client": 1, "examples_per_day": 1, "batch": 1,
                "test_per_task": 1, "rank": 1, "hidden": 1, "sleep_steps": 1}
        problems = [f"{k}={getattr(self, k)!r}; expected an int >= {lo}" for k, lo in ints.items()
                    if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int)
                    or getattr(self, k) < lo]
        if not problems and self.tasks_per_client > self.tasks:
            problems.append(f"tasks_per_client={self.tasks_per_client} > tasks={self.tasks}; expected at most the pool")
        if not problems and self.tasks_per_client > self.rounds:
            problems.append(f"tasks_per_client={self.tasks_per_client} > rounds={self.rounds}; expected a day or "
                            "more per task")
        if self.train not in ("all", "adapters"):
            problems.append(f"train={self.train!r}; expected 'all' or 'adapters'")
        if self.mode not in ("fleet", "alone"):
            problems.append(f"mode={self.mode!r}; expected 'fleet' or 'alone'")
        if not 0 < self.min_fraction <= 1:
            problems.append(f"min_fraction={self.min_fraction!r}; expected a share in (0, 1]")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            problems.append(f"epsilon={self.epsilon!r}; expected a finite number > 0, or None")
        if problems:
            raise ValueError("FleetSimulation: " + "; ".join(problems))

    @property
    def privacy_delta(self) -> float:
        """The delta of the fleet's privacy: ``delta``, or ``1 / (10 * clients)``."""
        return self.delta if self.delta is not None else 1.0 / (10 * self.clients)

    @property
    def min_merged(self) -> int:
        """Updates a round needs to release a model."""
        return max(1, math.ceil(self.min_fraction * self.clients))


# ----------------------------------------------------------------- the clients' worlds (pure)
def client_tasks(config: FleetSimulation) -> list[list[int]]:
    """Each client's tasks, in the order it sees them."""
    rng = np.random.default_rng([config.seed, 26])
    return [[int(t) for t in rng.choice(config.tasks, size=config.tasks_per_client, replace=False)]
            for _ in range(config.clients)]


def charging_nights(config: FleetSimulation) -> np.ndarray:
    """``(clients, rounds)`` bool: whether client ``k``'s phone is on the charger the night after day ``d``."""
    from edge_sleep.simulate.days import draw_days
    from edge_sleep.simulate.profiles import load_profile

    profile = load_profile(config.profile)
    out = np.ones((config.clients, config.rounds), dtype=bool)
    for k in range(config.clients):
        days = ([profile.day] * config.rounds if profile.variation is None
                else draw_days(profile.day, profile.variation, config.rounds, seed=config.seed * 1000 + k))
        out[k] = [d.charging_at(_CHARGE_HOUR) for d in days]
    return out


@lru_cache(maxsize=4)
def _pool(tasks: int, seed: int, test_per_task: int) -> list[PermutedTask]:
    return permuted_mnist(tasks, seed, test_per_task=test_per_task)


@dataclass(frozen=True)
class _Model:
    """The fleet's model factory (a picklable callable: Flower's workers build models with it)."""

    hidden: int
    seed: int

    def __call__(self) -> torch.nn.Module:
        return mlp(self.seed, hidden=self.hidden)


def _settings(config: FleetSimulation) -> tuple[WakeConfig, SleepConfig, StoreConfig]:
    return (WakeConfig(train=config.train, lora_rank=config.rank),
            SleepConfig(min_steps=config.sleep_steps, fisher_steps=min(config.sleep_steps, 200)),
            StoreConfig(capacity_records=500))


class _Day:
    """A client's day (picklable: Flower's workers run it): learn the day's images of its current
    task, log the CPU seconds, and refuse the round when its phone is off the charger."""

    def __init__(self, config: FleetSimulation, folder: Path) -> None:
        self.config, self.folder = config, folder
        self.tasks, self.charging = client_tasks(config), charging_nights(config)

    def __call__(self, es: EdgeSleep, node: int, server_round: int) -> int:
        c, d = self.config, server_round - 1
        task = _pool(c.tasks, c.seed, c.test_per_task)[self.tasks[node][d * c.tasks_per_client // c.rounds]]
        start = ((node * c.rounds + d) * c.examples_per_day) % max(1, task.steps - c.examples_per_day)
        x, y = task.train_sample(start + c.examples_per_day)
        x, y = x[start:], y[start:]
        cpu = time.process_time()
        for i in range(0, len(y), c.batch):
            es.learn(x[i:i + c.batch], y[i:i + c.batch], stream=task.name)
        log_usage(self.folder / f"node-{node}" / "usage.jsonl", {"day": d, "day_cpu_s": time.process_time() - cpu})
        if not self.charging[node, d]:
            raise NodeUnavailable(f"its phone is off the charger the night after day {d}: no night, no round")
        return int(len(y))


def _accuracies(model: torch.nn.Module, config: FleetSimulation) -> list[float]:
    model.eval()
    out = []
    with torch.no_grad():
        for task in _pool(config.tasks, config.seed, config.test_per_task):
            x, y = task.evaluation()
            out.append(float((model(x).argmax(1) == y).float().mean()))
    return out


# ----------------------------------------------------------------- the runs
def _alone(config: FleetSimulation, folder: Path) -> dict[str, Any]:
    """Each client by itself: its days, and a night after each charging one."""
    wake, sleep, store = _settings(config)
    day, models = _Day(config, folder), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of Flower's simulated clients: their CPU seconds compare
    for k in range(config.clients):
        es = EdgeSleep(mlp(config.seed, hidden=config.hidden), store=folder / f"node-{k}" / "replay.db",
                       store_config=store, wake=wake, sleep=sleep, seed=config.seed * 1000 + k)
        try:
            for r in range(1, config.rounds + 1):
                try:
                    day(es, k, r)
                except NodeUnavailable:
                    continue
                if config.nights:
                    cpu = time.process_time()
                    es.sleep()
                    log_usage(folder / f"node-{k}" / "usage.jsonl", {"night_cpu_s": time.process_time() - cpu})
            models.append(es.model)
        finally:
            es.store.close()
    torch.set_num_threads(threads)
    return {"models": models, "rounds": []}


def _fleet(config: FleetSimulation, folder: Path) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from edge_sleep.fleet.apps import (ClientSetup, client_app, fleet_of, fleet_strategy, fleet_weights,
                                       privacy_spent, server_app)
    from edge_sleep.fleet.privacy import FleetPrivacy

    wake, sleep, store = _settings(config)
    model = _Model(config.hidden, config.seed)
    setup = ClientSetup(folder=folder, make_model=model, day=_Day(config, folder), wake=wake, sleep=sleep,
                        store=store, seed=config.seed * 1000, nights=config.nights)
    start = EdgeSleep(model(), wake=wake)
    initial, fingerprint = fleet_weights(start), start.fingerprint
    privacy = None
    charging = charging_nights(config)
    if config.epsilon is not None:
        privacy = FleetPrivacy(epsilon=float(config.epsilon), delta=config.privacy_delta, rounds=config.rounds,
                               clip=config.clip)
    # under privacy the noise is sized for the fewest clients a round can merge, so no round spends more
    fewest = max(config.min_merged, int(charging.sum(axis=0).min()))
    strategy = fleet_strategy(fingerprint=fingerprint, privacy=privacy, num_nodes=fewest if privacy else None,
                              payload=config.payload, int8=config.int8, rank=config.rank, merge=config.merge,
                              min_merged=config.min_merged, fraction_train=1.0, fraction_evaluate=0.0,
                              # every client each round: Flower sizes its sample from the nodes connected
                              # when it asks, which at the first round may be a few (min_train_nodes floors it)
                              min_available_nodes=config.clients, min_train_nodes=config.clients)
    final: dict[str, Any] = {}
    server = server_app(strategy, initial, rounds=config.rounds,
                        on_result=lambda result: final.update(arrays=result.arrays.to_torch_state_dict()))
    run_simulation(server_app=server, client_app=client_app(setup), num_supernodes=config.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": min(2, os.cpu_count() or 1)}})
    inner = fleet_of(strategy)
    fleet_model = model()
    fleet_model.load_state_dict(final["arrays"])
    rounds = [{"round": r, "merged": len(inner.merged.get(r, [])), "absent": sum(a == r for a, _ in inner.absent),
               "bytes": inner.bytes_sent.get(r, []), "refused": [x for x in inner.refused if x[0] == r]}
              for r in range(1, config.rounds + 1)]
    return {"models": [fleet_model] * config.clients, "rounds": rounds,
            "epsilon": privacy_spent(strategy, config.privacy_delta)}


def simulate_fleet(config: FleetSimulation, folder: Path) -> dict[str, Any]:
    """Run ``config`` with its clients' files under ``folder`` (which must be empty or new);
    return the report (see the module's docstring)."""
    from edge_sleep.simulate.calibrate import calibrate
    from edge_sleep.simulate.profiles import load_profile

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"folder {str(folder)!r} is not empty; expected a new folder for the clients' files")
    folder.mkdir(parents=True, exist_ok=True)
    profile = load_profile(config.profile)
    tasks, charging = client_tasks(config), charging_nights(config)
    began = time.perf_counter()
    run = _alone(config, folder) if config.mode == "alone" else _fleet(config, folder)
    wall = time.perf_counter() - began
    cal = calibrate(repeats=3, threads=1)
    clients: list[dict[str, Any]] = []
    measured: dict[int, list[float]] = {}
    for k, model in enumerate(run["models"]):
        acc = measured[id(model)] = measured.get(id(model)) or _accuracies(model, config)
        unseen = [a for t, a in enumerate(acc) if t not in tasks[k]]
        usage = [json.loads(line) for line in (folder / f"node-{k}" / "usage.jsonl").read_text().splitlines()]
        cpu = sum(u.get("day_cpu_s", 0.0) + u.get("night_cpu_s", 0.0) for u in usage)
        clients.append({"client": k, "tasks": tasks[k], "avg_acc": float(np.mean(acc)),
                        "unseen_acc": float(np.mean(unseen)) if unseen else None, "task_acc": acc,
                        "cpu_s": cpu, "energy_j": profile.power_active_w * cal.device_seconds(
                            cpu, relative_speed=profile.relative_speed),
                        "nights_charging": int(charging[k].sum())})
    bytes_per_round = [float(np.mean(r["bytes"])) for r in run["rounds"] if r["bytes"]]
    return {"config": asdict(config), "clients": clients, "rounds": run["rounds"],
            "avg_acc": float(np.mean([c["avg_acc"] for c in clients])),
            "unseen_acc": float(np.mean([c["unseen_acc"] for c in clients if c["unseen_acc"] is not None])),
            "bytes_per_round": float(np.mean(bytes_per_round)) if bytes_per_round else 0.0,
            "full_weights_bytes": 4 * sum(p.numel() for p in mlp(config.seed, hidden=config.hidden).parameters()),
            "epsilon": run.get("epsilon"), "wall_s": wall}



def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines a person reads: the fleet, then each client."""
    c = report["config"]
    lines = [f"{c['clients']} clients x {c['rounds']} rounds on {c['profile']} ({c['mode']}, nights "
             f"{'on' if c['nights'] else 'off'}, payload {c['payload']}{' int8' if c['int8'] else ''}"
             f"{'' if c['epsilon'] is None else ', epsilon ' + format(report['epsilon'], '.2f') + ' spent'})",
             f"accuracy over all {c['tasks']} tasks {report['avg_acc']:.3f}; on each client's unseen tasks "
             f"{report['unseen_acc']:.3f}; bytes sent a round per client {report['bytes_per_round']:,.0f} "
             f"(full weights {report['full_weights_bytes']:,}); {report['wall_s']:.0f} s"]
    for r in report["rounds"]:
        lines.append(f"  round {r['round']}: {r['merged']} merged, {r['absent']} off the charger, {len(r['refused'])} refused")
    lines.append("  client  tasks                avg acc  unseen acc  energy J  nights charging")
    for k in report["clients"]:
        unseen = "-" if k["unseen_acc"] is None else f"{k['unseen_acc']:.3f}"
        lines.append(f"  {k['client']:>6}  {str(k['tasks']):<20} {k['avg_acc']:.3f}    {unseen:>6}      "
                     f"{k['energy_j']:8.1f}  {k['nights_charging']}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Each client's accuracy on every task (seen tasks marked), and the bytes each round sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = report["clients"]
    acc = np.array([k["task_acc"] for k in clients])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    im = left.imshow(acc, vmin=0, vmax=1, aspect="auto", cmap="viridis")
    for i, k in enumerate(clients):
        for t in k["tasks"]:
            left.plot(t, i, marker="s", markersize=5, markerfacecolor="none", markeredgecolor="white")
    left.set_yticks(range(len(clients)))
    left.set_xticks(range(acc.shape[1]))
    left.set_xlabel("task (white square: the client learned it)")
    left.set_ylabel("client")
    left.set_title(f"accuracy per client and task (mean {report['avg_acc']:.3f})")
    fig.colorbar(im, ax=left, fraction=0.04)
    rounds = [r for r in report["rounds"] if r["bytes"]]
    if rounds:
        right.bar([r["round"] for r in rounds], [float(np.mean(r["bytes"])) / 1024 for r in rounds])
        right.axhline(report["full_weights_bytes"] / 1024, color="grey", linestyle="--", label="full weights")
        right.set_yscale("log")
        right.set_xticks([r["round"] for r in rounds])
        right.legend()
    right.set_xlabel("round")
    right.set_ylabel("KiB sent per client")
    right.set_title("bytes per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
