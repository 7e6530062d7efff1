"""Hyperparameter grid for every method of the P-MNIST benchmark: ``python benchmarks/tune.py``.

One grid for all: learning rate in {0.05, 0.1, 0.2}; where a method has them, the replay loss
weights alpha (logit distillation) in {0.3, 1.0} and beta (stored labels) in {0.5, 1.0}, and the
anchor lambda in {10, 100}. SSR's sleep settings (sleep lr 0.03, distillation 0.3, noise 0.1)
stay at the values facts.md reports; SSR takes lambda 10 there too (lambda >= 100 blocked new
tasks). Tuning uses seed 100 (not an evaluation seed) and the first 10 tasks, to fit the
machine; the winners go into ``TUNED`` in edge_sleep/bench/pmnist.py.
Writes benchmarks/results/tune.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune.json"))
    args = parser.parse_args()

    jobs = []
    for name, hp in grid():
        method = next(m for m in default_methods({**TUNED, name: hp}) if m.name == name)
        jobs.append((dataclasses.replace(method, name=f"{name} {json.dumps(hp, sort_keys=True)}"), args.seed))
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers, {"n_tasks": args.tasks})
    rows = sorted(({"method": r["method"].split(" ", 1)[0], "hp": json.loads(r["method"].split(" ", 1)[1]),
                    "avg_acc": r["avg_acc"]} for r in results), key=lambda r: (r["method"], -r["avg_acc"]))
    best = {}
    for r in rows:
        best.setdefault(r["method"], r)
    payload = {"tasks": args.tasks, "seed": args.seed, "grid": {"lr": LRS, "alpha": ALPHAS, "beta": BETAS,
               "lambda": LAMBDAS}, "best": best, "runs": rows, "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    for name, r in best.items():
        print(f"{name:8s} {r['avg_acc']:.4f} {r['hp']}")


if __name__ == "__main__":
    main()
