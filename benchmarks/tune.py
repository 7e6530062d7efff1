"""Tune every P-MNIST method on validation data, with the same budget: ``python benchmarks/tune.py``.

Protocol: tuning seed 100 (not an evaluation seed), the first 10 tasks, each trained on the first
50,000 of its 60,000 training images and scored on the last 10,000 (the validation split); the
test set is never touched. Every method gets the same total budget: exactly 16 configurations on
that horizon, its grid (at most 16) and then follow-ups around the grid's winner (a step beyond
an edge it sits on, a factor either side on a ``STEPPED`` axis, midpoints to its neighbours; see
:func:`follow_ups`) until it has run 16. Follow-ups count inside the budget.

Stage 1 tunes the day of the methods that have no night: naive, ewc, er, derpp. Stage 2 tunes
what each row adds on top of a stage-1 winner (DER++'s wake, or the naive day for the sleep-only
row) with its own 16 configurations: the controls ``derpp_ewc`` and ``derpp_storefisher``
(anchor strength and decay, the Fisher from the task's data or from the store),
``derpp_eq`` (the extra replay's learning rate and distillation weight), and SSR's rows, whose
night (learning rate, anchor decay, length) counts inside the 16. The winners go into ``TUNED``
in edge_sleep/bench/pmnist.py (a test checks they agree with this file's output). Writes
benchmarks/results/tune.json (about two hours on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

from edge_sleep.bench.pmnist import run_all
from edge_sleep.bench.provenance import provenance
from edge_sleep.bench.strategies import Method, default_methods

BUDGET = 16
STAGE1: dict[str, dict[str, list[float]]] = {
    "naive": {"lr": [0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]},
    "ewc": {"lr": [0.05, 0.1, 0.2], "lam": [1.0, 10.0, 100.0, 1000.0], "decay": [0.9]},
    "er": {"lr": [0.05, 0.1, 0.2], "beta": [0.5, 1.0, 2.0, 4.0]},
    "derpp": {"lr": [0.05, 0.1, 0.2], "alpha": [0.3, 1.0], "beta": [0.5, 1.0]},
}
STAGE2: dict[str, dict[str, list[float]]] = {
    "derpp_ewc": {"lam": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0], "decay": [0.7, 0.9]},
    "derpp_storefisher": {"lam": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0], "decay": [0.7, 0.9]},
    "derpp_eq": {"sleep_lr": [0.01, 0.03, 0.1, 0.2], "sleep_distill": [0.3, 1.0, 3.0]},
    # the night's length: the ratio's steps either side, and the probe that stops a night which no longer helps
    "ssr": {"lam": [1.0, 3.0, 10.0], "sleep_lr": [0.0003, 0.003], "decay": [0.7, 0.9], "sleep_distill": [1.0],
            "ratio": [1.0], "probe": [50.0]},
    "ssr_sleep_only": {"lr": [0.1, 0.2], "lam": [3.0, 10.0, 30.0], "ratio": [1.0, 2.0],
                       "sleep_lr": [0.03], "sleep_distill": [1.0]},
    "ssr_adapters": {"lr": [0.05, 0.1, 0.2], "lam": [3.0, 10.0], "sleep_lr": [0.03, 0.1],
                     "sleep_distill": [1.0]},
}
BOUNDS = {"decay": (0.0, 1.0)}  # axes with a closed range; the others only need to stay > 0
STEPPED = {"ratio": 2.0}  # single-valued axes the follow-ups still explore, a factor either side


def configs(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every combination of the grid's axes."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def follow_ups(grid: dict[str, list[float]], tried: list[dict[str, float]], winner: dict[str, float],
               n: int) -> list[dict[str, float]]:
    """Up to ``n`` new configurations around ``winner``, one axis changed each.

    In this order, on each numeric axis (every value tried on it, grid and follow-ups): one
    geometric step beyond the edge the winner sits on; on a single-valued axis of ``STEPPED``, its
    factor up and down; then the geometric midpoints between the winner and its neighbours.
    Configurations already ``tried`` are skipped.
    """
    edges: list[dict[str, float]] = []
    stepped: list[dict[str, float]] = []
    middles: list[dict[str, float]] = []
    for axis, values in grid.items():
        vs = sorted({*values, *(t[axis] for t in tried)})
        if len(values) == 1 and axis in STEPPED:
            stepped += [{**winner, axis: round(winner[axis] * f, 6)} for f in (STEPPED[axis], 1 / STEPPED[axis])]
        if len(vs) < 2 or len(values) < 2:
            continue
        lo, hi = BOUNDS.get(axis, (0.0, float("inf")))
        i = vs.index(winner[axis])
        if i in (0, len(vs) - 1):
            beyond = vs[-1] * vs[-1] / vs[-2] if i else vs[0] * vs[0] / vs[1]
            edges.append({**winner, axis: round(min(max(beyond, lo), hi), 6)})
        for j in (i - 1, i + 1):
            if 0 <= j < len(vs):
                middles.append({**winner, axis: round(math.sqrt(vs[i] * vs[j]), 6)})
    out: list[dict[str, float]] = []
    for c in edges + stepped + middles:
        if c not in tried and c not in out and all(v > 0 for v in c.values()):
            out.append(c)
    return out[:n]


def method_for(name: str, hp: dict[str, float], base: dict[str, dict[str, float]]) -> Method:
    """The row ``name`` with hyperparameters ``hp`` on top of the stage-1 winners ``base``."""
    methods = default_methods({**base, name: hp})
    return next(m for m in methods if m.name == name)


def run_configs(todo: list[tuple[str, dict[str, float]]], base: dict[str, dict[str, float]],
                args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = []
    for name, hp in todo:
        m = method_for(name, hp, base)
        jobs.append((dataclasses.replace(m, name=f"{name} {json.dumps(hp, sort_keys=True)}"), args.seed))
    jobs.sort(key=lambda j: -(1 + (j[0].sleep.steps_per_wake_step if j[0].sleep else 0)))
    kw = {"n_tasks": args.tasks, "split": "validation", "train_per_task": args.train_per_task}
    results = run_all(jobs, args.workers, kw, cache=args.cache)
    return [{"method": r["method"].split(" ", 1)[0], "hp": json.loads(r["method"].split(" ", 1)[1]),
             "val_avg_acc": r["avg_acc"], "day_s": r["day_s"], "night_s": r["night_s"]} for r in results]


def tune_stage(grids: dict[str, dict[str, list[float]]], base: dict[str, dict[str, float]],
               args: argparse.Namespace, runs: list[dict[str, Any]],
               budget: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Run the grids, then follow-ups around each winner until every method has run exactly
    ``args.budget`` configurations; return ``{method: best run}``."""
    for name, grid in grids.items():
        n = len(configs(grid))
        if n > args.budget:
            raise SystemExit(f"{name}'s grid has {n} configurations, more than the budget of {args.budget}")
    stage = run_configs([(name, hp) for name, grid in grids.items() for hp in configs(grid)], base, args)

    def mine(name: str) -> list[dict[str, Any]]:
        return [r for r in stage if r["method"] == name]

    def best_of(name: str) -> dict[str, Any]:
        return max(mine(name), key=lambda r: r["val_avg_acc"])

    while True:  # rounds of follow-ups, run together so both workers stay busy
        todo = [(name, hp) for name, grid in grids.items()
                for hp in follow_ups(grid, [r["hp"] for r in mine(name)], best_of(name)["hp"],
                                     args.budget - len(mine(name)))]
        if not todo:
            break
        stage += run_configs(todo, base, args)
    for name, grid in grids.items():
        total = len(mine(name))
        if total != args.budget:
            raise SystemExit(f"{name} ran {total} configurations, not {args.budget}: its grid left no follow-up")
        budget[name] = {"grid": len(configs(grid)), "follow_ups": total - len(configs(grid)), "total": total}
    runs += stage
    return {name: best_of(name) for name in grids}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--train-per-task", type=int, default=50000)
    parser.add_argument("--budget", type=int, default=BUDGET,
                        help=f"configurations per method; another value is a smoke run on the grids' first "
                             f"values (default {BUDGET})")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune.json"))
    parser.add_argument("--cache", type=Path, default=None,
                        help="a JSON-lines file of finished runs, added to as each ends; a rerun takes the runs it "
                             "holds for the same sources and settings, so a tuning killed or spread over several "
                             "sittings loses only the runs in flight")
    args = parser.parse_args(argv)
    if args.seed in (0, 1, 2):
        parser.error(f"--seed={args.seed} is an evaluation seed; tune on another one")
    stage1, stage2 = STAGE1, STAGE2
    if args.budget != BUDGET:  # a smoke run: every grid cut to leave one follow-up inside the budget
        stage1 = {k: _shrink(v, args.budget - 1) for k, v in stage1.items()}
        stage2 = {k: _shrink(v, args.budget - 1) for k, v in stage2.items()}

    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    budget: dict[str, dict[str, int]] = {}
    best = tune_stage(stage1, {}, args, runs, budget)
    base = {k: v["hp"] for k, v in best.items()}
    if stage2:
        best.update(tune_stage(stage2, base, args, runs, budget))
    payload = {
        "protocol": {"seed": args.seed, "tasks": args.tasks, "train_per_task": args.train_per_task,
                     "scored_on": "validation: the last 10,000 training images of each task",
                     "budget_per_method": args.budget},
        "grids": {**stage1, **stage2},
        "budget": budget,
        "best": {k: {"hp": v["hp"], "val_avg_acc": v["val_avg_acc"]} for k, v in best.items()},
        "runs": sorted(runs, key=lambda r: (r["method"], -r["val_avg_acc"])),
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload.update(provenance())  # the commit the numbers describe
    args.out.write_text(json.dumps(payload, indent=1))
    for name, r in best.items():
        print(f"{name:15s} {r['val_avg_acc']:.4f} {r['hp']}  ({budget[name]['total']} configurations)")
    print(f"wrote {args.out} in {payload['wall_s']:.0f} s")
    return payload


def _shrink(grid: dict[str, list[float]], n: int) -> dict[str, list[float]]:
    """The grid cut to at most ``n`` configurations (first values of each axis), for smoke runs."""
    out = {k: list(v) for k, v in grid.items()}
    while len(configs(out)) > n:
        k = max(out, key=lambda a: len(out[a]))
        out[k] = out[k][:-1]
    return out


if __name__ == "__main__":
    main()
