"""Permuted MNIST, the standard protocol: 20 tasks, MLP 784-100-100-10, one pass, batch 128.

Every method runs on the same seeds (the seed fixes the permutations, the data order and the
initial weights), the same int8 SQLite replay store of ``buffer`` records and the same
evaluation. Each task is one day: wake through the task's images, then (for methods that sleep)
one night. Final runs train on all 60,000 images of a task and evaluate on the test set; tuning
runs (``split="validation"``) train on the first 50,000 and evaluate on the last 10,000, so no
test image is ever used to choose a hyperparameter. Runs go to parallel worker processes, one
thread each, and every run measures its own daytime and night-time cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_sleep.bench.datasets import DigitTask, digit_stream
from edge_sleep.bench.metrics import (average_accuracy, backward_transfer, forgetting, paired_differences,
                                     plasticity, sample_std)
from edge_sleep.bench.provenance import machine, provenance
from edge_sleep.bench.strategies import Method, default_methods, ewc_consolidate, store_fisher_consolidate
from edge_sleep.config import SleepConfig, StoreConfig
from edge_sleep.runtime import EdgeSleep
from edge_sleep.sleep import mask_sparsity

__all__ = ["SMOKE", "SMOKE_TOLERANCE", "TUNED", "mlp", "pretrain", "run_method", "evaluate", "summarize",
           "smoke_kwargs", "main"]

# The winners of `python benchmarks/tune.py` (every method's budget, grid and validation scores
# are in benchmarks/results/tune.json; a test checks that these agree with it). Tuning seed 100,
# 10 tasks, trained on 50,000 images a task and scored on the 10,000 validation images; 16
# configurations a row, follow-ups included.
TUNED: dict[str, dict[str, float]] = {
    "naive": {"lr": 0.122474},
    "ewc": {"decay": 0.9, "lam": 10.0, "lr": 0.2},
    "er": {"beta": 4.0, "lr": 0.1},
    "derpp": {"alpha": 0.3, "beta": 1.0, "lr": 0.2},
    "derpp_ewc": {"decay": 1.0, "lam": 1.0},
    "derpp_storefisher": {"decay": 0.7, "lam": 3.0},
    "derpp_eq": {"sleep_distill": 0.3, "sleep_lr": 0.03},
    "ssr": {"decay": 0.9, "lam": 3.0, "probe": 50.0, "ratio": 2.0, "sleep_distill": 1.0, "sleep_lr": 0.0003},
    "ssr_sleep_only": {"lam": 3.0, "lr": 0.4, "ratio": 1.0, "sleep_distill": 1.0, "sleep_lr": 0.03},
    "ssr_adapters": {"lam": 3.0, "lr": 0.4, "sleep_distill": 1.0, "sleep_lr": 0.03},
}


# `--smoke`: a minute of the benchmark that a test reruns and must match exactly on a machine like
# the one that wrote benchmarks/results/pmnist_smoke.json (any change to the numerics fails it until
# the file is regenerated on purpose); on another CPU, whose kernels round differently, within
# SMOKE_TOLERANCE of every accuracy.
SMOKE: dict[str, Any] = {"tasks": 3, "seeds": [0], "train_per_task": 8192, "test_per_task": 1000,
                         "methods": ["naive", "derpp", "ssr", "ssr_adapters"]}
SMOKE_TOLERANCE = 0.03  # measured: up to 0.006 between an AVX-512 host and the one before it


def smoke_kwargs() -> dict[str, Any]:
    """:func:`run_method`'s keyword arguments for a smoke run."""
    return {"n_tasks": SMOKE["tasks"], "buffer": 500, "train_per_task": SMOKE["train_per_task"],
            "test_per_task": SMOKE["test_per_task"], "split": "test"}


def mlp(seed: int = 0, *, hidden: int = 100) -> nn.Module:
    """The protocol's MLP 784-100-100-10 (``hidden`` wide), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def evaluate(es: EdgeSleep, task: DigitTask) -> float:
    """Accuracy of ``es`` on ``task``'s evaluation images (test or validation split)."""
    x, y = task.evaluation()
    pred = es.predict(x)
    return float((pred == y.to(pred.device)).float().mean())


def pretrain(model: nn.Module, task: DigitTask, lr: float, batch: int = 128) -> None:
    """One pass of plain SGD over ``task``: the base a phone would ship with."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for x, y in task.batches(batch):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_method(
    method: Method,
    seed: int,
    *,
    n_tasks: int = 20,
    buffer: int = 500,
    batch: int = 128,
    split: Literal["test", "validation"] = "test",
    train_per_task: int | None = None,
    test_per_task: int = 10000,
    on_task: Callable[[int], None] | None = None,
    stream: str = "pmnist",
) -> dict[str, Any]:
    """Train ``method`` through the task stream of ``seed``; return its accuracy matrix and costs.

    ``stream`` names the digits' stream (:func:`edge_sleep.bench.datasets.digit_stream`): P-MNIST,
    the protocol's, by default; ``"rotated"`` and ``"split"`` for ``benchmarks/defaults.py``.

    Costs: ``day_s`` is the time inside ``learn`` (the wake steps), ``night_s`` the time of the
    work at each task end (a night, or online EWC's Fisher), ``replayed`` the stored records
    replayed while awake, ``replay_steps`` the gradient steps whose loss includes stored records.
    """
    tasks = digit_stream(stream, n_tasks, seed, split=split, train_per_task=train_per_task,
                         test_per_task=test_per_task)
    model = mlp(seed)
    for _ in range(method.pretrain_passes if method.pretrain_lr > 0 else 0):
        pretrain(model, tasks[0], method.pretrain_lr, batch)
    acc = np.full((n_tasks, n_tasks), np.nan)
    replay_steps = wake_steps = replayed = night_steps = skipped = 0
    day_s = night_s = 0.0
    with tempfile.TemporaryDirectory() as d:
        es = EdgeSleep(model, store=Path(d) / "replay.db",
                       store_config=StoreConfig(capacity_records=buffer),
                       wake=method.wake, sleep=method.sleep or SleepConfig(), seed=seed)
        for i, task in enumerate(tasks):
            for x, y in task.batches(batch):
                t0 = time.perf_counter()
                stats = es.learn(x, y, stream=task.name)
                day_s += time.perf_counter() - t0
                wake_steps += 1
                replayed += stats.replayed
                replay_steps += stats.replayed > 0
                skipped += stats.skipped is not None
            t0 = time.perf_counter()
            if method.ewc_samples:
                ewc_consolidate(es, *task.train_sample(method.ewc_samples), method.ewc_decay)
            if method.store_fisher:
                store_fisher_consolidate(es, method.ewc_decay)
            if method.sleep is not None:
                steps = es.sleep().steps
                replay_steps += steps
                night_steps += steps
            if method.ewc_samples or method.store_fisher or method.sleep is not None:
                night_s += time.perf_counter() - t0
            for j in range(i + 1):
                acc[i, j] = evaluate(es, tasks[j])
            if on_task is not None:
                on_task(i)
        sparsity = mask_sparsity(es.masks)
        es.store.close()
    return {"method": method.name, "seed": seed, "split": split, "acc": acc.tolist(),
            "avg_acc": average_accuracy(acc), "bwt": backward_transfer(acc), "forgetting": forgetting(acc),
            "diag": plasticity(acc),
            "wall_s": day_s + night_s, "day_s": day_s, "night_s": night_s, "wake_steps": wake_steps,
            "replayed": replayed, "replay_steps": replay_steps, "night_steps": night_steps,
            "skipped_steps": skipped, "sparsity": sparsity}


def _worker(args: tuple[Method, int, dict[str, Any]]) -> dict[str, Any]:
    torch.set_num_threads(1)
    method, seed, kw = args
    return run_method(method, seed, **kw)


def job_key(method: Method, seed: int, kw: dict[str, Any], sources: str) -> str:
    """What fixes a run's result: the method (its name and every setting), the seed, the protocol
    and the package's sources (:func:`edge_sleep.bench.provenance.sources_sha256`)."""
    blob = json.dumps({"method": repr(method), "seed": seed, "kw": kw, "sources": sources}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(cache: Path) -> dict[str, dict[str, Any]]:
    """The runs a cache file holds, by key (a line cut short by a kill is skipped)."""
    done: dict[str, dict[str, Any]] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            try:
                entry = json.loads(line)
                done[entry["key"]] = entry["result"]
            except (ValueError, KeyError, TypeError):
                continue
    return done


def run_all(jobs: list[tuple[Method, int]], workers: int, kw: dict[str, Any],
            cache: Path | None = None) -> list[dict[str, Any]]:
    """Run ``(method, seed)`` jobs in ``workers`` processes, with a progress bar.

    With ``cache`` (a JSON-lines file), each finished run is appended to it at once (flushed and
    fsynced), and a run it already holds under the same :func:`job_key` is taken from it instead
    of run again: a benchmark that is killed, or spread over several sittings, loses at most the
    runs in flight. Runs of other sources or settings in the file are ignored.
    """
    from tqdm import tqdm

    from edge_sleep.bench.provenance import sources_sha256

    keys = {}
    done: dict[str, dict[str, Any]] = {}
    if cache is not None:
        sources = sources_sha256()
        keys = {(m.name, s): job_key(m, s, kw, sources) for m, s in jobs}
        done = _cached(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
    results = [done[keys[(m.name, s)]] for m, s in jobs if keys.get((m.name, s)) in done]
    args = [(m, s, kw) for m, s in jobs if keys.get((m.name, s)) not in done]

    def keep(r: dict[str, Any]) -> None:
        results.append(r)
        if cache is not None:
            with cache.open("a") as f:
                f.write(json.dumps({"key": keys[(r["method"], r["seed"])], "result": r}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    with tqdm(total=len(jobs), initial=len(results), desc="runs", unit="run") as bar:
        if workers <= 1:
            for a in args:
                keep(_worker(a))
                bar.update(1)
        elif args:
            with mp.get_context("spawn").Pool(workers) as pool:
                for r in pool.imap_unordered(_worker, args):
                    keep(r)
                    bar.set_postfix_str(f"{r['method']} seed {r['seed']}: {r['avg_acc']:.3f}")
                    bar.update(1)
    return results


def summarize(results: list[dict[str, Any]], methods: list[Method]) -> dict[str, Any]:
    """Per-method means over seeds (and the per-seed figures) in the results JSON layout.

    ``avg_acc_std`` is the sample standard deviation over seeds; ``diag`` the mean just-learned
    accuracy (plasticity); ``paired_diff_vs[control]`` the per-seed differences of ``avg_acc``
    against each control row (every row not named ``ssr*``) run on the same seeds, with their mean
    and sample standard deviation. Daytime cost: ``day_ms_per_step`` (measured milliseconds per wake step) and
    ``day_replay_per_step`` (stored records replayed per wake step). Night-time cost:
    ``night_ms`` (measured milliseconds of all the run's nights, or online EWC's Fisher, together)
    and ``night_steps`` (replay steps of all the nights).
    """
    out: dict[str, Any] = {}
    for m in methods:
        rs = sorted((r for r in results if r["method"] == m.name), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["avg_acc"] for r in rs]

        def mean(key: str, runs: list[dict[str, Any]] = rs) -> float:
            return float(np.mean([r[key] for r in runs]))

        out[m.name] = {
            "avg_acc": float(np.mean(accs)),
            "avg_acc_std": sample_std(accs),
            "bwt": mean("bwt"),
            "forgetting": mean("forgetting"),
            "diag": mean("diag"),
            "wall_s": mean("wall_s"),
            "replay_steps": int(round(mean("replay_steps"))),
            "day_ms_per_step": float(np.mean([1000 * r["day_s"] / r["wake_steps"] for r in rs])),
            "day_replay_per_step": float(np.mean([r["replayed"] / r["wake_steps"] for r in rs])),
            "night_ms": 1000 * mean("night_s"),
            "night_steps": int(round(mean("night_steps"))),
            "skipped_steps": int(sum(r["skipped_steps"] for r in rs)),
            "sparsity": mean("sparsity"),
            "seeds": [r["seed"] for r in rs],
            "per_seed_avg_acc": accs,
            "acc_matrix_first_seed": rs[0]["acc"],
            "notes": m.notes,
        }
    for name, row in out.items():
        row["paired_diff_vs"] = {c: paired_differences(row["per_seed_avg_acc"], out[c]["per_seed_avg_acc"])
                                 for c in out if c != name and not c.startswith("ssr")
                                 and out[c]["seeds"] == row["seeds"]}
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = ["| method | avg acc | ± std | BWT | day ms/step | day replay/step | night steps | night s "
             "| sparsity | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    first = [n for n in ("ssr_sleep_only",) if n in summary]  # the row an app developer reads first
    for name in first + [n for n in summary if n not in first]:
        r = summary[name]
        lines.append(f"| {name} | {r['avg_acc']:.3f} | {r['avg_acc_std']:.3f} | {r['bwt']:+.3f} | "
                     f"{r['day_ms_per_step']:.2f} | {r['day_replay_per_step']:.0f} | {r['night_steps']} | "
                     f"{r['night_ms'] / 1000:.1f} | {r['sparsity']:.3f} | {len(r['seeds'])} |")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Three panels: every method's curve; SSR's rows against the controls; accuracy vs day cost.

    The curves are the mean accuracy on the tasks seen so far, after each task (first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(name: str) -> np.ndarray:
        acc = np.array(summary[name]["acc_matrix_first_seed"], dtype=float)
        return np.array([np.nanmean(acc[i, : i + 1]) for i in range(acc.shape[0])])

    palette = plt.get_cmap("tab20")
    colors = {name: palette(i % 20) for i, name in enumerate(summary)}
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(19, 5.5), layout="constrained")
    main_rows = [n for n in summary if not n.startswith("ssr_") or n in ("ssr_sleep_only", "ssr_adapters")]
    zoom_rows = [n for n in summary if n.startswith(("ssr", "derpp"))]
    for ax, rows in ((left, main_rows), (mid, zoom_rows)):
        for name in rows:
            c = curve(name)
            style = ":" if name.startswith("ssr_") else "--" if name.startswith("derpp_") else "-"
            ax.plot(range(1, len(c) + 1), c, style, color=colors[name],
                    label=f"{name} ({summary[name]['avg_acc']:.3f})")
        ax.set_xlabel("tasks learned")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, ncol=2)
    left.set_ylabel("mean accuracy on tasks seen so far")
    left.set_title("methods (first seed; legend: mean over seeds)")
    mid.set_title("SSR, its ablations and the controls (first seed)")
    for name in main_rows:  # the ablations share SSR's day
        r = summary[name]
        right.errorbar(r["day_ms_per_step"], r["avg_acc"], yerr=r["avg_acc_std"], fmt="o", color=colors[name],
                       capsize=3)
        right.annotate(f"{name} ({r['day_replay_per_step']:.0f} replayed)", (r["day_ms_per_step"], r["avg_acc"]),
                       textcoords="offset points", xytext=(5, 3), fontsize=7)
    right.set_xlabel("daytime cost: measured ms per wake step (one thread)")
    right.set_ylabel("final average accuracy (mean ± std over seeds)")
    right.set_title("accuracy against the cost the user waits for")
    right.grid(alpha=0.3)
    fig.suptitle("Permuted MNIST, MLP 784-100-100-10, 500-record int8 SQLite store")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--buffer", type=int, default=500)
    parser.add_argument("--train-per-task", type=int, default=None,
                        help="training images per task (default: all 60,000)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of rows to run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/pmnist.json "
                                                                "(pmnist_smoke.json with --smoke)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a JSON-lines file of finished runs: each run is added as it ends, and a rerun "
                             "takes the runs it holds for the same sources and settings (resume a killed run)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE['tasks']} tasks of {SMOKE['train_per_task']} images, seed 0, rows "
                             f"{', '.join(SMOKE['methods'])}, one process: about a minute; tests/test_bench.py "
                             "reruns it and must match it exactly")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.seeds, args.methods, args.workers = SMOKE["tasks"], SMOKE["seeds"], SMOKE["methods"], 1
        args.train_per_task = SMOKE["train_per_task"]
    args.out = args.out or Path("benchmarks/results/pmnist_smoke.json" if args.smoke else "benchmarks/results/pmnist.json")

    methods = default_methods(TUNED)
    if args.methods:
        known = {m.name for m in methods}
        unknown = sorted(set(args.methods) - known)
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {sorted(known)}")
        methods = [m for m in methods if m.name in args.methods]
    jobs = [(m, s) for m in methods for s in args.seeds]
    # longest first so the workers finish together
    jobs.sort(key=lambda j: -(1 + (j[0].sleep.steps_per_wake_step if j[0].sleep else 0)))
    kw = {"n_tasks": args.tasks, "buffer": args.buffer, "train_per_task": args.train_per_task, "split": "test"}
    if args.smoke:
        kw = smoke_kwargs()
    t0 = time.perf_counter()
    results = run_all(jobs, args.workers, kw, cache=args.cache)
    summary = summarize(results, methods)
    payload = {"tasks": args.tasks, "buffer": args.buffer, "seeds": args.seeds,
               "train_per_task": args.train_per_task or 60000, "batch": 128, "split": "test", "smoke": args.smoke,
               "test_per_task": kw.get("test_per_task", 10000),
               "hyperparameters": TUNED, "total_wall_s": time.perf_counter() - t0, "methods": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload.update(provenance())  # the commit the numbers describe
    if args.smoke:  # every run's accuracy matrix, what the test compares, and the CPU it ran on
        payload["machine"] = machine()
        payload["runs"] = [{"method": r["method"], "seed": r["seed"], "acc": r["acc"]} for r in results]
    args.out.write_text(json.dumps(payload, indent=1))
    if not args.smoke:
        plot_summary(summary, args.out.with_suffix(".png"))
    print(format_table(summary))
    print(f"\nwrote {args.out} in {payload['total_wall_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
