"""Permuted MNIST, the standard protocol: 20 tasks, MLP 784-100-100-10, one pass, batch 128.

Every method runs on the same seeds (the seed fixes the permutations, the data order and the
initial weights), the same int8 SQLite replay store of ``buffer`` records and the same
evaluation. Each task is one day: wake through the task's 60k images, then (for methods that
sleep) one night. Runs go to parallel worker processes, one thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_sleep.bench.datasets import PermutedTask, permuted_mnist
from edge_sleep.bench.metrics import average_accuracy, backward_transfer, forgetting
from edge_sleep.bench.strategies import Method, default_methods, ewc_consolidate
from edge_sleep.config import SleepConfig, StoreConfig
from edge_sleep.runtime import EdgeSleep
from edge_sleep.sleep import mask_sparsity

__all__ = ["TUNED", "mlp", "run_method", "evaluate", "summarize", "main"]

# Chosen by benchmarks/tune.py (grid and scores in benchmarks/results/tune.json), tuning seed 100,
# which is not one of the evaluation seeds; SSR's night by `tune.py --grid sleep --tasks 20`
# (benchmarks/results/tune_sleep.json): the consolidation kernel (prune/strengthen) cost accuracy
# there, so the headline SSR runs without it and the `ssr_prune` row measures it.
TUNED: dict[str, dict[str, float]] = {
    "naive": {"lr": 0.1},
    "ewc": {"lr": 0.2, "lam": 10.0, "decay": 0.9},
    "er": {"lr": 0.1},
    "derpp": {"lr": 0.2, "alpha": 1.0, "beta": 1.0},
    "ssr": {"lr": 0.2, "alpha": 0.3, "beta": 1.0, "lam": 10.0, "sleep_lr": 0.03, "sleep_distill": 1.0,
            "prune_frac": 0.0, "strengthen_eta": 0.0},
}


def mlp(seed: int) -> nn.Module:
    """The protocol's MLP 784-100-100-10, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def evaluate(es: EdgeSleep, task: PermutedTask) -> float:
    """Test accuracy of ``es`` on ``task``."""
    x, y = task.test()
    return float((es.predict(x) == y).float().mean())


def run_method(
    method: Method,
    seed: int,
    *,
    n_tasks: int = 20,
    buffer: int = 500,
    batch: int = 128,
    train_per_task: int = 60000,
    test_per_task: int = 10000,
    on_task: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``method`` through the task stream of ``seed``; return its accuracy matrix and costs."""
    tasks = permuted_mnist(n_tasks, seed, train_per_task=train_per_task, test_per_task=test_per_task)
    model = mlp(seed)
    acc = np.full((n_tasks, n_tasks), np.nan)
    replay_steps = 0
    train_s = 0.0
    with tempfile.TemporaryDirectory() as d:
        es = EdgeSleep(model, store=Path(d) / "replay.db",
                       store_config=StoreConfig(capacity_records=buffer),
                       wake=method.wake, sleep=method.sleep or SleepConfig(), seed=seed)
        replays = method.wake.replay_batch > 0 and (method.wake.replay_alpha > 0 or method.wake.replay_beta > 0)
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            for x, y in task.batches(batch):
                if replays and len(es.store) > 0:
                    replay_steps += 1
                es.learn(x, y, stream=task.name)
            if method.ewc_samples:
                ewc_consolidate(es, *task.train_sample(method.ewc_samples), method.ewc_decay)
            if method.sleep is not None:
                replay_steps += es.sleep().steps
            train_s += time.perf_counter() - t0
            for j in range(i + 1):
                acc[i, j] = evaluate(es, tasks[j])
            if on_task is not None:
                on_task(i)
        sparsity = mask_sparsity(es.masks)
        es.store.close()
    return {"method": method.name, "seed": seed, "acc": acc.tolist(), "avg_acc": average_accuracy(acc),
            "bwt": backward_transfer(acc), "forgetting": forgetting(acc), "wall_s": train_s,
            "replay_steps": replay_steps, "sparsity": sparsity}


def _worker(args: tuple[Method, int, dict[str, Any]]) -> dict[str, Any]:
    torch.set_num_threads(1)
    method, seed, kw = args
    return run_method(method, seed, **kw)


def run_all(jobs: list[tuple[Method, int]], workers: int, kw: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``(method, seed)`` jobs in ``workers`` processes, with a progress bar."""
    from tqdm import tqdm

    args = [(m, s, kw) for m, s in jobs]
    results = []
    with tqdm(total=len(args), desc="runs", unit="run") as bar:
        if workers <= 1:
            for a in args:
                results.append(_worker(a))
                bar.update(1)
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for r in pool.imap_unordered(_worker, args):
                    results.append(r)
                    bar.set_postfix_str(f"{r['method']} seed {r['seed']}: {r['avg_acc']:.3f}")
                    bar.update(1)
    return results


def summarize(results: list[dict[str, Any]], methods: list[Method]) -> dict[str, Any]:
    """Per-method means over seeds (and the per-seed figures) in the results JSON layout."""
    out: dict[str, Any] = {}
    for m in methods:
        rs = sorted((r for r in results if r["method"] == m.name), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["avg_acc"] for r in rs]
        out[m.name] = {
            "avg_acc": float(np.mean(accs)),
            "avg_acc_std": float(np.std(accs)),
            "bwt": float(np.mean([r["bwt"] for r in rs])),
            "forgetting": float(np.mean([r["forgetting"] for r in rs])),
            "wall_s": float(np.mean([r["wall_s"] for r in rs])),
            "replay_steps": int(np.mean([r["replay_steps"] for r in rs])),
            "sparsity": float(np.mean([r["sparsity"] for r in rs])),
            "seeds": [r["seed"] for r in rs],
            "per_seed_avg_acc": accs,
            "acc_matrix_first_seed": rs[0]["acc"],
            "notes": m.notes,
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = ["| method | avg acc | ± std | BWT | forgetting | wall s | replay steps | sparsity | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['avg_acc']:.4f} | {r['avg_acc_std']:.4f} | {r['bwt']:+.4f} | "
                     f"{r['forgetting']:.4f} | {r['wall_s']:.0f} | {r['replay_steps']} | "
                     f"{r['sparsity']:.3f} | {len(r['seeds'])} |")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Mean accuracy on the tasks seen so far, after each task (first seed).

    Left: every method. Right: SSR and its ablations against DER++, zoomed in.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(name: str) -> np.ndarray:
        acc = np.array(summary[name]["acc_matrix_first_seed"], dtype=float)
        return np.array([np.nanmean(acc[i, : i + 1]) for i in range(acc.shape[0])])

    palette = plt.get_cmap("tab20")
    colors = {name: palette(i % 20) for i, name in enumerate(summary)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    main_rows = [n for n in summary if not n.startswith("ssr_")]
    zoom_rows = [n for n in summary if n.startswith(("ssr", "derpp"))]
    for ax, rows in ((left, main_rows), (right, zoom_rows)):
        for name in rows:
            c = curve(name)
            style = ":" if name.startswith("ssr_") else "--" if name.endswith("_eq") else "-"
            ax.plot(range(1, len(c) + 1), c, style, color=colors[name],
                    label=f"{name} ({summary[name]['avg_acc']:.3f})")
        ax.set_xlabel("tasks learned")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, ncol=2)
    left.set_ylabel("mean accuracy on tasks seen so far")
    left.set_title("all methods (mean over seeds in the legend)")
    right.set_title("SSR and its ablations vs DER++ (first seed)")
    fig.suptitle("Permuted MNIST, MLP 784-100-100-10, 500-record int8 SQLite store")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--buffer", type=int, default=500)
    parser.add_argument("--train-per-task", type=int, default=60000)
    parser.add_argument("--methods", nargs="+", default=None, help="subset of rows to run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pmnist.json"))
    args = parser.parse_args(argv)

    methods = default_methods(TUNED)
    if args.methods:
        known = {m.name for m in methods}
        unknown = sorted(set(args.methods) - known)
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {sorted(known)}")
        methods = [m for m in methods if m.name in args.methods]
    jobs = [(m, s) for m in methods for s in args.seeds[: m.seeds]]
    # longest first so the two workers finish together
    jobs.sort(key=lambda j: -(1 + (j[0].sleep.steps_per_wake_step if j[0].sleep else 0)))
    kw = {"n_tasks": args.tasks, "buffer": args.buffer, "train_per_task": args.train_per_task}
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers, kw)
    summary = summarize(results, methods)
    payload = {"tasks": args.tasks, "buffer": args.buffer, "seeds": args.seeds,
               "train_per_task": args.train_per_task, "batch": 128, "hyperparameters": TUNED,
               "total_wall_s": time.perf_counter() - t0, "methods": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    plot_summary(summary, args.out.with_suffix(".png"))
    print(format_table(summary))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {payload['total_wall_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
