"""Hyperparameter grid for every method of the P-MNIST benchmark: ``python benchmarks/tune.py``.

One grid for all: learning rate in {0.05, 0.1, 0.2}; where a method has them, the replay loss
weights alpha (logit distillation) in {0.3, 1.0} and beta (stored labels) in {0.5, 1.0}, and the
anchor lambda in {10, 100}. SSR's sleep settings (sleep lr 0.03, distillation 0.3, noise 0.1)
stay at the values facts.md reports; SSR takes lambda 10 there too (lambda >= 100 blocked new
tasks). Tuning uses seed 100 (not an evaluation seed) and the first 10 tasks, to fit the
machine; the winners go into ``TUNED`` in edge_sleep/bench/pmnist.py.
Writes benchmarks/results/tune.json.

``--grid sleep --tasks 20`` then tunes SSR's night on top of its tuned wake (sleep lr in
{0.03, 0.1}, distillation weight in {0.3, 1.0}, consolidation kernel off / prune 1% a night /
prune 1% and strengthen the top 1% by 1%), on all 20 tasks of the same tuning seed; writes
benchmarks/results/tune_sleep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

from edge_sleep.bench.pmnist import TUNED, run_all
from edge_sleep.bench.strategies import default_methods

LRS = (0.05, 0.1, 0.2)
ALPHAS = (0.3, 1.0)
BETAS = (0.5, 1.0)
LAMBDAS = (10.0, 100.0)


def grid() -> list[tuple[str, dict[str, float]]]:
    """``(method, hyperparameters)`` pairs of the grid."""
    out: list[tuple[str, dict[str, float]]] = []
    out += [("naive", {"lr": lr}) for lr in LRS]
    out += [("er", {"lr": lr}) for lr in LRS]
    out += [("ewc", {"lr": lr, "lam": lam, "decay": 0.9}) for lr, lam in itertools.product(LRS, LAMBDAS)]
    out += [("derpp", {"lr": lr, "alpha": a, "beta": b}) for lr, a, b in itertools.product(LRS, ALPHAS, BETAS)]
    out += [("ssr", {**TUNED["ssr"], "lr": lr, "alpha": a, "beta": b, "lam": 10.0})
            for lr, a, b in itertools.product(LRS, ALPHAS, BETAS)]
    return out


def sleep_grid() -> list[tuple[str, dict[str, float]]]:
    """SSR's night on top of its tuned wake: sleep lr x distillation x consolidation kernel."""
    kernels = ({"prune_frac": 0.0, "strengthen_eta": 0.0}, {"prune_frac": 0.01, "strengthen_eta": 0.0},
               {"prune_frac": 0.01, "strengthen_eta": 0.01})
    return [("ssr", {**TUNED["ssr"], "sleep_lr": lr, "sleep_distill": dw, **k})
            for lr, dw, k in itertools.product((0.03, 0.1), ALPHAS, kernels)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grid", choices=("methods", "sleep"), default="methods",
                        help="'methods': every method's wake grid; 'sleep': SSR's night settings")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/tune{'' if args.grid == 'methods' else '_sleep'}.json")

    jobs = []
    for name, hp in (grid() if args.grid == "methods" else sleep_grid()):
        method = next(m for m in default_methods({**TUNED, name: hp}) if m.name == name)
        jobs.append((dataclasses.replace(method, name=f"{name} {json.dumps(hp, sort_keys=True)}"), args.seed))
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers, {"n_tasks": args.tasks})
    rows = sorted(({"method": r["method"].split(" ", 1)[0], "hp": json.loads(r["method"].split(" ", 1)[1]),
                    "avg_acc": r["avg_acc"]} for r in results), key=lambda r: (r["method"], -r["avg_acc"]))
    best = {}
    for r in rows:
        best.setdefault(r["method"], r)
    payload = {"tasks": args.tasks, "seed": args.seed, "which": args.grid, "grid": {"lr": LRS, "alpha": ALPHAS, "beta": BETAS,
               "lambda": LAMBDAS}, "best": best, "runs": rows, "wall_s": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    for name, r in best.items():
        print(f"{name:8s} {r['avg_acc']:.4f} {r['hp']}")


if __name__ == "__main__":
    main()
