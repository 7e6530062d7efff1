"""Differential privacy of the replay store, per record and per class: what it costs in
accuracy, what it stops.

    python benchmarks/privacy.py            # about 40 minutes on 2 cores

writes ``benchmarks/results/privacy.json``::

    {"commit": ..., "rows": [{"design": "none", "epsilon": null, "avg_acc": ..., "mia_auc": ...,
                              "store_mia_auc": ..., "tpr_at_1pct_fpr": ..., "bytes_stored": ...}, ...], ...}

on 10-task Permuted MNIST with a 500-record store, the headline method (``ssr``, tuned
hyperparameters of ``benchmarks/tune.py``), delta 1e-5, for three designs:

* ``"none"``: no privacy (raw records);
* ``"record"``: each stored record clipped and noised (epsilon 8, 4, 1);
* ``"stats"``: nothing of an example is stored; each night releases the day's class statistics
  (epsilon 8, 4, 1 per release) and the store receives dreams drawn from them
  (:mod:`edge_sleep.dreams`). Same store capacity, so the same bytes.

Protocol:

* Each task streams 50,000 of MNIST's 60,000 training images (in its own order), a random split
  by the seed; the other 10,000 are never streamed, so non-members come from the very
  distribution members come from (:func:`member_stream`). Accuracy is on the test set.
* Every run records, through ``WakeStats.slots``, which streamed example each store slot holds;
  after the last night the members are the raw examples behind the 500 records then in the store
  (with privacy, the records themselves are noised versions of them).
* Non-members: for each member, ``--nonmembers-per-member`` never-streamed images of the same
  task (same permutation), so members and non-members have the same task mix.
* Two attacks (:mod:`edge_sleep.audit`): the loss threshold, and difficulty calibration against
  a reference model. Each (seed, epsilon) trains two runtimes that differ only in the store's
  random stream (which examples the reservoir keeps, the night's draws): each is the other's
  reference. ``mia_auc`` and ``tpr_at_1pct_fpr`` are those of the stronger attack (higher mean).
* Store-side attack ``store_mia_auc`` (:func:`edge_sleep.audit.store_audit`): an attacker with the
  store's file (and key) scores each member and non-member by its distance to the nearest record
  of its label, both clipped like a private record and passed through the int8 codec.
* Control ``seen_not_stored_auc``: the same attacks with streamed examples the store did not keep
  in place of members (seen once while awake, never replayed). What it shows is leakage of the
  day's single pass, which store privacy does not cover.
* Control ``no_replay``: the same stream with no store at all (``naive``): the accuracy floor
  that replay lifts the model from.
* The clipping norm ``C`` is the median L2 norm of the first 1,000 images of task 1 (a typical
  record, as ``PrivacyConfig`` advises); noise comes from ``os.urandom``.

Target (issue 6): at epsilon 8, attack AUC at most 0.55 with at most 3 points of accuracy lost
against no privacy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_sleep.audit import audit, store_audit
from edge_sleep.bench.datasets import PermutedTask, load_mnist, permuted_mnist
from edge_sleep.bench.metrics import average_accuracy, sample_std
from edge_sleep.bench.pmnist import TUNED, evaluate, mlp
from edge_sleep.bench.provenance import provenance
from edge_sleep.bench.strategies import Method, default_methods
from edge_sleep.config import PrivacyConfig, SleepConfig, StoreConfig
from edge_sleep.privacy import GRID_STEPS, rdp_noise_multiplier
from edge_sleep.runtime import EdgeSleep

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 1e-5
STREAMED = 50_000  # of MNIST's 60,000 training images; the rest are the non-member pool
STORE_SEED_OFFSET = 1000  # the partner run's store seed: seed + this


def _method(name: str) -> Method:
    return next(m for m in default_methods(TUNED) if m.name == name)


def _streamable(seed: int) -> np.ndarray:
    """The 50,000 of MNIST's 60,000 training images the seed's tasks stream from: a random split."""
    return np.random.default_rng([seed, 60000]).permutation(60000)[:STREAMED]


def member_stream(tasks: int, seed: int, train_per_task: int, test_per_task: int = 10000) -> list[PermutedTask]:
    """The seed's Permuted-MNIST stream over :func:`_streamable`'s images (each task its own order
    of them), evaluated on the test set. A random split, not the first 50,000: a review found the
    plain loss attack scoring 0.47 between MNIST's last 10,000 training images and another unseen
    pool, so a fixed split can tell members from non-members by where they come from (issue 20)."""
    streamable = torch.from_numpy(_streamable(seed))
    return [dataclasses.replace(t, order=streamable[t.order], split="test")
            for t in permuted_mnist(tasks, seed, split="validation", train_per_task=train_per_task,
                                    test_per_task=test_per_task)]


def nonmember_pool(seed: int) -> np.ndarray:
    """The 10,000 training images the seed's stream never contains (the non-members' pool)."""
    return np.setdiff1d(np.arange(60000), _streamable(seed))


def clip_norm(task: PermutedTask) -> float:
    """The median L2 norm of the first 1,000 images of ``task``'s stream."""
    x, _ = task.train_sample(1000)
    return float(x.norm(dim=1).median())


def _test_view(task: PermutedTask) -> PermutedTask:
    return dataclasses.replace(task, split="test")


def train(method_name: str, seed: int, store_seed: int, epsilon: float | None, *, tasks: int, buffer: int,
          train_per_task: int, test_per_task: int, checkpoint: Path | None, design: str = "record") -> dict[str, Any]:
    """One run through the stream; returns accuracy and, per store slot, the example it holds
    (``design="stats"``: the store holds dreams, and members are the examples streamed)."""
    torch.set_num_threads(1)
    method = _method(method_name)
    stream = member_stream(tasks, seed, train_per_task, test_per_task)
    privacy = PrivacyConfig() if epsilon is None else PrivacyConfig(
        epsilon=epsilon, delta=DELTA, max_norm=clip_norm(stream[0]), design=design)  # type: ignore[arg-type]
    holds: dict[int, tuple[int, int]] = {}  # slot -> (task, MNIST training index)
    acc = np.full((tasks, tasks), np.nan)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        es = EdgeSleep(mlp(seed), store=Path(d) / "replay.db", store_config=StoreConfig(capacity_records=buffer),
                       wake=method.wake, sleep=method.sleep or SleepConfig(), seed=store_seed, privacy=privacy)
        for t, task in enumerate(stream):
            for b, (x, y) in enumerate(task.batches(128)):
                stats = es.learn(x, y, stream=task.name)
                idx = task.order[b * 128: b * 128 + x.shape[0]].tolist()
                for row, slot in enumerate(stats.slots):
                    if slot >= 0:
                        holds[slot] = (t, idx[row])
            if method.sleep is not None:
                es.sleep()
            for j in range(t + 1):
                acc[t, j] = evaluate(es, _test_view(stream[j]))
        present = set(es.store.slots().tolist())
        records = es.store.read(es.store.slots())  # what an attacker with the store's file (and key) reads
        bytes_stored = es.store.bytes_used()
        if checkpoint is not None:
            es.save(checkpoint)
        es.store.close()
    members = sorted(v for s, v in holds.items() if s in present)
    if design == "stats":  # no slot holds an example: every example of the stream was in a release
        rng = np.random.default_rng([seed, store_seed])
        members = [(t, int(i)) for t in range(tasks) for i in rng.choice(stream[t].order.numpy(), buffer // tasks,
                                                                           replace=False)]
    return {"method": method_name, "seed": seed, "store_seed": store_seed, "epsilon": epsilon, "design": design,
            "bytes_stored": bytes_stored,
            "max_norm": privacy.max_norm if epsilon is not None else None, "avg_acc": average_accuracy(acc),
            "members": members, "records": (records.x.reshape(len(records.y), -1).clone(), records.y.clone()),
            "wall_s": time.perf_counter() - t0}


def _worker(args: tuple[str, int, int, float | None, dict[str, Any]]) -> dict[str, Any]:
    name, seed, store_seed, eps, kw = args
    return train(name, seed, store_seed, eps, **kw)


def design_of(epsilon: float | None, design: str) -> str:
    return "none" if epsilon is None else design


def _examples(stream: list[PermutedTask], pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    xtr, ytr, _, _ = load_mnist()
    idx = torch.tensor([i for _, i in pairs], dtype=torch.int64)
    x = xtr[idx].float() / 255.0
    for k, (t, _) in enumerate(pairs):  # each example through its own task's permutation
        x[k] = x[k][stream[t].perm]
    return x, ytr[idx]


def _sample_pairs(rng: np.random.Generator, members: list[tuple[int, int]], per_member: int,
                  pool: np.ndarray, exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """``per_member`` examples of each member's task from ``pool`` (MNIST indices), none in ``exclude``."""
    out: list[tuple[int, int]] = []
    tasks, counts = np.unique([t for t, _ in members], return_counts=True)
    for t, c in zip(tasks.tolist(), counts.tolist()):
        choices = [int(i) for i in rng.permutation(pool) if (t, int(i)) not in exclude][: c * per_member]
        out += [(t, i) for i in choices]
    return out


def audit_pair(runs: tuple[dict[str, Any], dict[str, Any]], dirs: tuple[Path, Path], *, tasks: int,
               train_per_task: int, per_member: int) -> list[dict[str, Any]]:
    """Attack each run of a pair, the other its reference; and the seen-not-stored control."""
    seed = runs[0]["seed"]
    stream = member_stream(tasks, seed, train_per_task)
    rng = np.random.default_rng(seed + 7)
    unseen_pool = nonmember_pool(seed)  # the 10,000 images no task streams
    streamed = {(t, int(i)) for t, task in enumerate(stream) for i in task.order.tolist()}
    model = [EdgeSleep.load(d, mlp(seed), store=":memory:") for d in dirs]
    out = []
    try:
        for k in (0, 1):
            target, reference = model[k], model[1 - k]
            members = [tuple(m) for m in runs[k]["members"]]
            nonmembers = _sample_pairs(rng, members, per_member, unseen_pool, set())  # type: ignore[arg-type]
            kept = set(members) | {tuple(m) for m in runs[1 - k]["members"]}
            seen = _sample_pairs(rng, members, 1, np.array(sorted({i for _, i in streamed})),  # type: ignore[arg-type]
                                 kept)
            seen = [p for p in seen if p in streamed]
            xm, ym = _examples(stream, members)  # type: ignore[arg-type]
            xn, yn = _examples(stream, nonmembers)
            xs, ys = _examples(stream, seen)
            main = audit(target, (xm, ym), (xn, yn), reference=reference)
            control = audit(target, (xs, ys), (xn, yn), reference=reference)
            on_disk = store_audit(runs[k]["records"], (xm, ym), (xn, yn), max_norm=runs[k]["max_norm"])
            out.append({"seed": seed, "store_seed": runs[k]["store_seed"], "members": len(members),
                        "nonmembers": len(nonmembers), "attacks": {a.attack: a.auc for a in main.attacks},
                        "tpr": {a.attack: a.tpr_at_1pct_fpr for a in main.attacks},
                        "seen_not_stored": {a.attack: a.auc for a in control.attacks},
                        "store_auc": on_disk.auc, "store_tpr": on_disk.tpr_at_1pct_fpr,
                        "member_loss": main.member_loss, "nonmember_loss": main.nonmember_loss})
    finally:
        for m in model:
            m.store.close()
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), sample_std(values)


def summarize(eps: float | None, runs: list[dict[str, Any]], audits: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["avg_acc"] for r in runs]
    attacks = sorted(audits[0]["attacks"])
    per = {a: {"auc": _mean_std([x["attacks"][a] for x in audits]),
               "tpr_at_1pct_fpr": _mean_std([x["tpr"][a] for x in audits]),
               "seen_not_stored_auc": _mean_std([x["seen_not_stored"][a] for x in audits])} for a in attacks}
    strongest = max(attacks, key=lambda a: per[a]["auc"][0])
    by_tpr = max(attacks, key=lambda a: per[a]["tpr_at_1pct_fpr"][0])
    acc_mean, acc_std = _mean_std(accs)
    store_auc, store_auc_std = _mean_std([x["store_auc"] for x in audits])
    return {
        "epsilon": eps, "avg_acc": acc_mean, "avg_acc_std": acc_std,
        "mia_auc": per[strongest]["auc"][0], "mia_auc_std": per[strongest]["auc"][1], "mia_attack": strongest,
        "tpr_at_1pct_fpr": per[by_tpr]["tpr_at_1pct_fpr"][0], "tpr_attack": by_tpr,
        "seen_not_stored_auc": max(per[a]["seen_not_stored_auc"][0] for a in attacks),
        "store_mia_auc": store_auc, "store_mia_auc_std": store_auc_std,
        "store_tpr_at_1pct_fpr": statistics.fmean(x["store_tpr"] for x in audits),
        "attacks": {a: {"auc": v["auc"][0], "auc_std": v["auc"][1], "tpr_at_1pct_fpr": v["tpr_at_1pct_fpr"][0],
                        "tpr_at_1pct_fpr_std": v["tpr_at_1pct_fpr"][1],
                        "seen_not_stored_auc": v["seen_not_stored_auc"][0]} for a, v in per.items()},
        "max_norm": runs[0]["max_norm"], "runs": len(runs), "per_run_avg_acc": accs,
        "per_run": [[r["seed"], r["store_seed"]] for r in runs],
        "bytes_stored": statistics.fmean(r["bytes_stored"] for r in runs),
        "member_loss": statistics.fmean(x["member_loss"] for x in audits),
        "nonmember_loss": statistics.fmean(x["nonmember_loss"] for x in audits),
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The table of ``result`` in docs/privacy.md (means over runs, ± the standard deviation)."""
    lines = ["| design | epsilon | noise norm / clip norm | average accuracy | points lost (paired, ± sd) | "
             "MIA AUC (strongest attack) | TPR at 1% FPR | AUC, seen but not stored | store-side AUC | bytes stored |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    delta = result["protocol"]["delta"]
    for r in result["rows"]:
        eps = "none" if r["epsilon"] is None else f"{r['epsilon']:g}"
        lost = "-" if r.get("acc_loss_paired") is None else \
            f"{r['acc_loss_paired']:.1f} ± {r['acc_loss_paired_std']:.1f}"
        # a record: the discrete noise per pixel in units of C (z times the grid's sensitivity 2 + 28 / 4096
        # steps of C / 4096), times sqrt(784 pixels)
        ratio = "-" if r["design"] != "record" else \
            f"{rdp_noise_multiplier(r['epsilon'], delta) * (2.0 + 28.0 / GRID_STEPS) * 28:.0f}"
        seen = "-" if r["design"] == "stats" else f"{r['seen_not_stored_auc']:.3f}"  # every example is in a release
        lines.append(f"| {r['design']} | {eps} | {ratio} | {r['avg_acc']:.3f} ± {r['avg_acc_std']:.3f} | {lost} | "
                     f"{r['mia_auc']:.3f} ± {r['mia_auc_std']:.3f} ({r['mia_attack']}) | "
                     f"{r['tpr_at_1pct_fpr']:.3f} | {seen} | "
                     f"{r['store_mia_auc']:.3f} ± {r['store_mia_auc_std']:.3f} | {r['bytes_stored'] / 1024:.0f} KiB |")
    c = result["controls"]["no_replay"]
    lines.append(f"| no store at all (naive) | | | {c['avg_acc']:.3f} ± {c['avg_acc_std']:.3f} | | | | | | |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], no_replay: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    none = [r for r in rows if r["design"] == "none"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for design in sorted({r["design"] for r in rows} - {"none"}):
        mine = sorted((r for r in rows if r["design"] == design), key=lambda r: -r["epsilon"])
        labels = [f"{r['epsilon']:g}" for r in mine]
        a1.errorbar(labels, [r["avg_acc"] for r in mine], yerr=[r["avg_acc_std"] for r in mine], marker="o",
                    capsize=4, label=f"{design}")
        a2.errorbar(labels, [max(r["mia_auc"], r["store_mia_auc"]) for r in mine], marker="o", capsize=4,
                    label=f"{design}: stronger of model- and store-side")
    if none:
        a1.axhline(none[0]["avg_acc"], ls="-", color="black", label="no privacy")
        a2.axhline(max(none[0]["mia_auc"], none[0]["store_mia_auc"]), ls="-", color="black", label="no privacy")
    a1.axhline(no_replay, ls="--", color="gray", label="no store (naive)")
    a1.set_xlabel("epsilon")
    a1.set_ylabel("average accuracy after 10 tasks")
    a1.legend()
    a2.axhline(0.5, ls="--", color="gray", label="chance")
    a2.axhline(0.55, ls=":", color="red", label="target at epsilon 8")
    a2.set_xlabel("epsilon")
    a2.set_ylabel("membership-inference ROC AUC")
    a2.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", nargs="+", default=["none", "8", "4", "1"])
    ap.add_argument("--designs", nargs="+", default=["record", "stats"], choices=["record", "stats"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--train-per-task", type=int, default=STREAMED)
    ap.add_argument("--test-per-task", type=int, default=10000)
    ap.add_argument("--nonmembers-per-member", type=int, default=10)
    ap.add_argument("--method", default="ssr")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    settings: list[tuple[str, float | None]] = [("none", None)] if None in epsilons else []
    settings += [(design, e) for design in args.designs for e in epsilons if e is not None]
    kw = {"tasks": args.tasks, "buffer": args.buffer, "train_per_task": args.train_per_task,
          "test_per_task": args.test_per_task}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        def folder(design: str, e: float | None, s: int, k: int) -> Path:
            return Path(d) / f"{design}-{e}-{s}-{k}"

        jobs = [(args.method, s, s + k * STORE_SEED_OFFSET, e,
                 {**kw, "design": "record" if design == "none" else design, "checkpoint": folder(design, e, s, k)})
                for design, e in settings for s in args.seeds for k in (0, 1)]
        jobs += [("naive", s, s, None, {**kw, "checkpoint": None}) for s in args.seeds]
        done: list[dict[str, Any]] = []
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.workers) as pool, tqdm(total=len(jobs), desc="runs", unit="run") as bar:
            for r in pool.imap_unordered(_worker, jobs):
                done.append(r)
                bar.update()
        rows = []
        for design, e in tqdm(settings, desc="attacks", unit="row"):
            runs = [r for r in done if r["method"] == args.method and r["epsilon"] == e
                    and design_of(r["epsilon"], r["design"]) == design]
            audits = []
            for s in args.seeds:
                pair = tuple(sorted((r for r in runs if r["seed"] == s), key=lambda r: r["store_seed"]))
                dirs = (folder(design, e, s, 0), folder(design, e, s, 1))
                audits += audit_pair(pair, dirs, tasks=args.tasks, train_per_task=args.train_per_task,  # type: ignore[arg-type]
                                     per_member=args.nonmembers_per_member)
            rows.append({"design": design, **summarize(e, runs, audits)})
    naive = [r["avg_acc"] for r in done if r["method"] == "naive"]
    no_replay, no_replay_std = _mean_std(naive)
    base_row = next((r for r in rows if r["design"] == "none"), None)
    base = None if base_row is None else base_row["avg_acc"]
    for r in rows:
        r["acc_loss_points"] = None if base is None else 100 * (base - r["avg_acc"])
        r["acc_loss_paired"] = r["acc_loss_paired_std"] = None
        if base_row is not None and r is not base_row:  # the same (seed, store seed) without privacy
            ref = {tuple(k): a for k, a in zip(base_row["per_run"], base_row["per_run_avg_acc"])}
            diffs = [100 * (ref[tuple(k)] - a) for k, a in zip(r["per_run"], r["per_run_avg_acc"]) if tuple(k) in ref]
            r["acc_loss_paired"], r["acc_loss_paired_std"] = _mean_std(diffs)
    at8 = next((r for r in rows if r["epsilon"] == 8.0 and r["design"] == "stats"), None) or \
        next((r for r in rows if r["epsilon"] == 8.0), None)
    result: dict[str, Any] = {
        "rows": rows,
        "controls": {"no_replay": {"avg_acc": no_replay, "avg_acc_std": no_replay_std, "method": "naive"}},
        "protocol": {"method": args.method, "hyperparameters": TUNED.get(args.method), "tasks": args.tasks,
                     "buffer": args.buffer, "train_per_task": args.train_per_task, "delta": DELTA,
                     "seeds": args.seeds, "runs_per_epsilon": 2 * len(args.seeds),
                     "designs": ["none", *args.designs], "stats_rank": PrivacyConfig.rank,
                     "nonmembers_per_member": args.nonmembers_per_member,
                     "store_seed_offset": STORE_SEED_OFFSET},
        "targets": None if at8 is None else {
            "epsilon": 8, "design": at8["design"], "mia_auc_max": 0.55, "acc_loss_points_max": 3.0,
            "mia_auc": at8["mia_auc"], "store_mia_auc": at8["store_mia_auc"],
            "acc_loss_points": at8["acc_loss_points"],
            "met": bool(max(at8["mia_auc"], at8["store_mia_auc"]) <= 0.55
                        and (at8["acc_loss_points"] or 0.0) <= 3.0)},
        "total_wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.update(provenance())  # the commit the numbers describe
    args.out.write_text(json.dumps(result, indent=2))
    plot(rows, no_replay, args.out.with_suffix(".png"))
    print(markdown_table(result))
    print(f"no store (naive): {no_replay:.3f}±{no_replay_std:.3f}; wrote {args.out} and "
          f"{args.out.with_suffix('.png')} in {result['total_wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
