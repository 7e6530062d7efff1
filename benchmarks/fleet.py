"""Does a fleet learn what no phone saw? ``python benchmarks/fleet.py``

Issue 26's benchmark. 20 simulated Galaxy S24s, each seeing 5 of 20 Permuted-MNIST tasks
(drawn per client: overlapping, non-identical), a task every two days, 1,024 images a day, for
10 days; a phone sleeps and joins the night's round only when it is on the charger (the
profile's drawn days: about one night in ten it is not). Every row runs the same days on the same
seeds (:mod:`edge_sleep.fleet.simulate`); nothing here is tuned (the defaults, a clip of 1.0):

- ``alone``: each client by itself, with its nights (the control: what one phone learns);
- ``fleet_no_nights``: the fleet on Flower, no nights (a day's change sent, FedAvg);
- ``fleet_nights``: the fleet with a night on each charging phone before it sends;
- ``fleet_dp8``: ``fleet_nights`` with differential privacy, epsilon 8 over the 10 rounds per
  client (updates clipped to 1.0 on the phone and again on the server, Flower's Gaussian noise
  sized for the fewest clients a round merges, Opacus' accounting);
- ``fleet_fisher``: ``fleet_nights`` merged by each weight's Fisher on each phone instead of
  FedAvg (the phones also send their anchor's Fisher, in float32: more bytes).

Every fleet row sends the round's change at the adapters' size (rank 8) in int8.

Per row: the average accuracy over all 20 tasks per client (for a fleet, the fleet's last model,
which every client takes; alone, each client's own), its sample standard deviation over seeds,
the accuracy on each client's unseen tasks, bytes sent per round per client; per-seed paired
differences; and ``sim_100_clients_s``: the wall time of 100 simulated clients for 5 rounds.
Writes benchmarks/results/fleet.json (and fleet.png). Runs are cached (``--cache``) by row, seed
and the package's sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_sleep.bench.metrics import paired_differences, sample_std
from edge_sleep.bench.provenance import provenance
from edge_sleep.fleet.simulate import FleetSimulation, simulate_fleet

BASE = FleetSimulation(clients=20, rounds=10, tasks=20, tasks_per_client=5, examples_per_day=1024,
                       test_per_task=1000, profile="galaxy-s24")
ROWS = {
    "alone": {"mode": "alone"},
    "fleet_no_nights": {"nights": False},
    "fleet_nights": {},
    "fleet_dp8": {"epsilon": 8.0},
    "fleet_fisher": {"merge": "fisher"},
}
SCALE = {"clients": 100, "rounds": 5}  # sim_100_clients_s
SCALE_TARGET_S = 15 * 60
BYTES_TARGET = 1 / 5


def run_one(config: FleetSimulation) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        report = simulate_fleet(config, Path(folder) / "clients")
    return {k: report[k] for k in ("avg_acc", "unseen_acc", "bytes_per_round", "full_weights_bytes", "epsilon",
                                   "wall_s", "rounds")} | {"clients": [
        {k: c[k] for k in ("client", "tasks", "avg_acc", "unseen_acc", "energy_j", "nights_charging")}
        for c in report["clients"]]}


def cached(cache: Path | None, key: dict[str, Any], run: Any) -> dict[str, Any]:
    text = json.dumps(key, sort_keys=True)
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            if row["key"] == text:
                return row["result"]
    result = run()
    if cache is not None:
        with cache.open("a") as f:
            f.write(json.dumps({"key": text, "result": result}) + "\n")
    return result


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(out["rows"])
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = np.arange(len(rows))
    for i, (key, label) in enumerate((("avg_acc", "all 20 tasks"), ("unseen_acc", "tasks the client never saw"))):
        means = [out["rows"][r][key] for r in rows]
        stds = [out["rows"][r].get(key + "_std", 0.0) for r in rows]
        ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3, label=label)
    ax.set_xticks(x, rows)
    ax.set_ylabel("accuracy (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{out['clients']} clients, {out['rounds']} rounds, {len(out['seeds'])} seeds")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--no-scale", action="store_true", help="skip the 100-client timing")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results/fleet_runs.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fleet.json"))
    args = parser.parse_args(argv)
    prov = provenance()
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for row in args.rows:
        for seed in args.seeds:
            config = dataclasses.replace(BASE, seed=seed, **ROWS[row])
            key = {"row": row, "config": dataclasses.asdict(config), "sources": prov["sources_sha256"]}
            began = time.perf_counter()
            result = cached(args.cache, key, lambda config=config: run_one(config))
            print(f"{row} seed {seed}: avg {result['avg_acc']:.3f}, unseen {result['unseen_acc']:.3f}, "
                  f"{result['bytes_per_round']:,.0f} B/round ({time.perf_counter() - began:.0f} s)", flush=True)
            per_seed.setdefault(row, []).append(result)
    rows = {}
    for row, results in per_seed.items():
        avg, unseen = [r["avg_acc"] for r in results], [r["unseen_acc"] for r in results]
        rows[row] = {"avg_acc": round(float(np.mean(avg)), 4), "avg_acc_std": round(sample_std(avg), 4),
                     "unseen_acc": round(float(np.mean(unseen)), 4), "unseen_acc_std": round(sample_std(unseen), 4),
                     "bytes_per_round": round(float(np.mean([r["bytes_per_round"] for r in results])), 1),
                     "epsilon": [r["epsilon"] for r in results], "wall_s": [round(r["wall_s"], 1) for r in results],
                     "per_seed_avg_acc": avg, "per_seed_unseen_acc": unseen,
                     "best_client_unseen_acc": [max(c["unseen_acc"] for c in r["clients"]) for r in results]}
    out: dict[str, Any] = {**prov, "clients": BASE.clients, "rounds": BASE.rounds, "tasks": BASE.tasks,
                           "tasks_per_client": BASE.tasks_per_client, "seeds": args.seeds, "rows": rows,
                           "full_weights_bytes": next(iter(per_seed.values()))[0]["full_weights_bytes"]}
    paired = {}
    for a, b, key in (("fleet_nights", "alone", "unseen_acc"), ("fleet_nights", "fleet_no_nights", "avg_acc"),
                      ("fleet_nights", "fleet_no_nights", "unseen_acc"), ("fleet_dp8", "fleet_nights", "avg_acc"),
                      ("fleet_fisher", "fleet_nights", "avg_acc"), ("fleet_fisher", "fleet_no_nights", "avg_acc"),
                      ("fleet_fisher", "fleet_no_nights", "unseen_acc")):
        if a in rows and b in rows:
            paired[f"{a}-{b}:{key}"] = paired_differences(rows[a][f"per_seed_{key}"], rows[b][f"per_seed_{key}"])
    out["paired"] = paired
    if not args.no_scale:
        config = dataclasses.replace(BASE, **SCALE, seed=0)
        key = {"row": "scale", "config": dataclasses.asdict(config), "sources": prov["sources_sha256"]}
        result = cached(args.cache, key, lambda: run_one(config))
        out["sim_100_clients_s"] = round(result["wall_s"], 1)
        print(f"100 clients x 5 rounds: {result['wall_s']:.0f} s", flush=True)
    targets: dict[str, Any] = {}
    if "fleet_nights" in rows and "alone" in rows:
        # every client alone on its unseen tasks, against the fleet with nights, seed by seed
        targets["fleet_nights_above_every_client_alone_unseen"] = all(
            f > a for f, a in zip(rows["fleet_nights"]["per_seed_unseen_acc"], rows["alone"]["best_client_unseen_acc"]))
    if "fleet_no_nights" in rows and "fleet_nights" in rows:
        d = paired["fleet_nights-fleet_no_nights:avg_acc"]
        targets["fleet_nights_above_no_nights_by_more_than_seed_spread"] = bool(d["mean"] > max(
            rows["fleet_nights"]["avg_acc_std"], rows["fleet_no_nights"]["avg_acc_std"]))
    if "fleet_nights" in rows:  # the adapters-sized rounds (fleet_fisher sends its Fisher too)
        targets["adapters_bytes_at_most_a_fifth"] = (rows["fleet_nights"]["bytes_per_round"]
                                                     <= BYTES_TARGET * out["full_weights_bytes"])
    if "sim_100_clients_s" in out:
        targets["sim_100_clients_within_15_min"] = out["sim_100_clients_s"] <= SCALE_TARGET_S
    out["targets"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.out.with_suffix(".png"))
    print(json.dumps({"rows": {r: {k: v for k, v in x.items() if not k.startswith("per_seed")}
                               for r, x in rows.items()}, "targets": targets}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
