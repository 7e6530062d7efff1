"""The P-MNIST runner on a tiny stream: the JSON interface, the cost accounting, the protocol."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from edge_sleep.bench.datasets import VALIDATION_SIZE, load_mnist, permuted_mnist
from edge_sleep.bench.pmnist import TUNED, main
from edge_sleep.bench.strategies import Method, default_methods
from tests.conftest import benchmark_module

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_pmnist_writes_the_documented_json(tmp_path: Path) -> None:
    out = tmp_path / "pmnist.json"
    rows = ["naive", "ewc", "derpp", "derpp_mammoth", "derpp_ewc", "derpp_eq", "ssr", "ssr_sleep_only", "ssr_adapters",
            "ssr_prune", "ssr_no_replay"]
    payload = main(["--tasks", "2", "--train-per-task", "256", "--seeds", "0", "--workers", "1",
                    "--methods", *rows, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload))
    assert data["tasks"] == 2 and data["buffer"] == 500 and data["seeds"] == [0] and data["split"] == "test"
    methods = data["methods"]
    assert list(methods) == rows
    for name, row in methods.items():
        acc = np.array(row["acc_matrix_first_seed"], dtype=float)
        assert row["avg_acc"] == pytest.approx(float(np.mean(acc[-1])))  # the mean of the last row
        assert row["per_seed_avg_acc"] == [row["avg_acc"]] and row["avg_acc_std"] == 0.0
        assert row["day_ms_per_step"] > 0 and row["skipped_steps"] == 0, name
        assert row["diag"] == pytest.approx(float(np.mean(np.diag(acc))))  # plasticity: just-learned accuracy
        # paired against every control row (not the ssr* rows), one seed: the difference itself, sd 0
        controls = [c for c in rows if not c.startswith("ssr") and c != name]
        assert list(row["paired_diff_vs"]) == controls, name
        for c in controls:
            assert row["paired_diff_vs"][c]["diffs"] == [round(row["avg_acc"] - methods[c]["avg_acc"], 6)]
            assert row["paired_diff_vs"][c]["std"] == 0.0
    steps_per_task = 2  # 256 images at batch 128
    # daytime replay: DER++ draws two batches a step once the store holds records; naive none
    assert methods["naive"]["day_replay_per_step"] == 0 and methods["naive"]["replay_steps"] == 0
    assert methods["ssr_sleep_only"]["day_replay_per_step"] == 0
    derpp = methods["derpp"]
    assert derpp["replay_steps"] == 2 * steps_per_task - 1  # the store is empty at step 1
    stored_before = [128, 256, 256]  # records in the store before steps 2..4 (capacity 500)
    assert derpp["day_replay_per_step"] == pytest.approx(sum(2 * min(128, n) for n in stored_before) / 4)
    # night: the replay control one step per wake step, as it was tuned; SSR at most its tuned 2
    # (its probe may stop a night early); methods without a night run none
    assert methods["derpp_eq"]["night_steps"] == 2 * steps_per_task
    assert 0 < methods["ssr"]["night_steps"] <= TUNED["ssr"]["ratio"] * 2 * steps_per_task
    assert methods["derpp"]["night_steps"] == 0 and methods["derpp"]["night_ms"] == 0
    assert methods["derpp_ewc"]["night_ms"] > 0  # its task-end Fisher is night-time work
    assert methods["ssr_no_replay"]["night_ms"] > 0 and methods["ssr_no_replay"]["night_steps"] == 0
    assert methods["ssr"]["sparsity"] == 0 and methods["ssr_prune"]["sparsity"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_tuning_never_sees_the_test_set_or_its_own_validation_images() -> None:
    val = permuted_mnist(3, seed=100, split="validation", train_per_task=50000)
    final = permuted_mnist(3, seed=100, split="test")
    xtr, _, _, _ = load_mnist()
    for task in val:
        assert int(task.order.max()) < len(xtr) - VALIDATION_SIZE  # trains on the first 50,000 only
        x, y = task.evaluation()
        assert x.shape == (VALIDATION_SIZE, 784)
    for task in final:
        assert task.order.numel() == 60000 and task.split == "test"
    with pytest.raises(ValueError, match="50000"):
        permuted_mnist(1, seed=0, split="validation", train_per_task=60000)


def test_tuned_hyperparameters_are_the_winners_of_the_committed_tuning_run() -> None:
    tune = json.loads((RESULTS / "tune.json").read_text())
    assert tune["protocol"]["seed"] not in (0, 1, 2)  # not an evaluation seed
    budgets = {name: b["total"] for name, b in tune["budget"].items()}  # follow-ups counted inside
    assert set(budgets) == set(TUNED) and set(budgets.values()) == {16}  # the same total budget for all
    for name, hp in TUNED.items():
        assert tune["best"][name]["hp"] == hp, name
        runs = [r["val_avg_acc"] for r in tune["runs"] if r["method"] == name]
        assert len(runs) == tune["budget"][name]["total"] and max(runs) == tune["best"][name]["val_avg_acc"]


def test_every_row_of_the_benchmark_is_built_from_tuned_values() -> None:
    methods = {m.name: m for m in default_methods(TUNED)}
    names = list(methods)
    assert names[:11] == ["naive", "ewc", "er", "derpp", "derpp_mammoth", "derpp_ewc", "derpp_storefisher",
                          "derpp_eq", "ssr", "ssr_sleep_only", "ssr_adapters"]
    assert len(names) == len(set(names))
    peer = methods["derpp_mammoth"].wake  # the peer's published arguments, not ours
    assert (peer.lr, peer.replay_alpha, peer.replay_beta, peer.replay_batch) == (0.2, 1.0, 0.5, 128)
    assert peer.max_grad_norm is None and peer.anchor_lambda == 0.0
    # the store-Fisher ablation is SSR's day with its night's replay removed
    ssr, no_replay = methods["ssr"], methods["ssr_no_replay"]
    assert no_replay.sleep is None and no_replay.store_fisher and no_replay.wake == ssr.wake
    assert ssr.sleep is not None and no_replay.ewc_decay == ssr.sleep.anchor_decay
    # the tuned night holds out a probe; its ablations take it away, one change each
    assert ssr.sleep.probe_records > 0 and ssr.sleep.steps_per_wake_step == TUNED["ssr"]["ratio"]
    assert methods["ssr_no_probe"].sleep == dataclasses.replace(ssr.sleep, probe_records=0)
    assert methods["ssr_1to10"].sleep == dataclasses.replace(ssr.sleep, steps_per_wake_step=10.0)
    assert methods["ssr_1to10_no_probe"].sleep == dataclasses.replace(ssr.sleep, steps_per_wake_step=10.0,
                                                                      probe_records=0)
    storefisher = methods["derpp_storefisher"]
    assert storefisher.store_fisher and storefisher.sleep is None and storefisher.wake.anchor_lambda == 3.0


def test_sources_sha256_names_the_sources_a_result_ran(tmp_path: Path) -> None:
    """Issue 22, item 6: a results file says which sources made it, even without git."""
    from edge_sleep.bench.provenance import provenance, sources_sha256

    pkg = tmp_path / "pkg"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "k.c").write_text("int f(void) { return 1; }\n")
    first = sources_sha256(pkg)
    (pkg / "sub" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00" * 8)  # not a source
    (pkg / "notes.md").write_text("prose")
    assert sources_sha256(pkg) == first and len(first) == 64
    (pkg / "sub" / "k.c").write_text("int f(void) { return 2; }\n")
    assert sources_sha256(pkg) != first
    assert provenance()["sources_sha256"] == sources_sha256()


def test_a_result_is_dirty_for_changed_sources_but_not_for_what_benchmarks_write(tmp_path: Path) -> None:
    """A benchmark that writes its plots before its JSON still records a clean commit; a changed source does not."""
    import shutil
    import subprocess

    from edge_sleep.bench.provenance import provenance

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "pkg").mkdir()
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "plot.png").write_bytes(b"old")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    assert provenance(repo / "pkg")["commit_dirty"] is False
    (repo / "benchmarks" / "results" / "plot.png").write_bytes(b"new")
    assert provenance(repo / "pkg")["commit_dirty"] is False
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert provenance(repo / "pkg")["commit_dirty"] is True


@pytest.mark.slow
def test_the_committed_smoke_result_is_reproduced_exactly() -> None:
    """Issue 22, item 6: a change to the numerics fails here until `python benchmarks/pmnist.py --smoke` is rerun.

    Exactly on a CPU like the one that wrote the file; on another (other vector kernels, other
    rounding) every accuracy within ``SMOKE_TOLERANCE``."""
    import torch

    from edge_sleep.bench.pmnist import SMOKE, SMOKE_TOLERANCE, run_method, smoke_kwargs
    from edge_sleep.bench.provenance import machine

    committed = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/pmnist_smoke.json").read_text())
    assert committed["smoke"] and committed["commit"] and len(committed["sources_sha256"]) == 64
    assert {(r["method"], r["seed"]) for r in committed["runs"]} == {(m, s) for m in SMOKE["methods"] for s in SMOKE["seeds"]}
    exact = committed["machine"] == machine()
    methods = {m.name: m for m in default_methods(TUNED)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's worker runs it
    try:
        for run in committed["runs"]:
            again = np.array(run_method(methods[run["method"]], run["seed"], **smoke_kwargs())["acc"])
            want = np.array(run["acc"])
            same = (np.array_equal(again, want, equal_nan=True) if exact
                    else np.allclose(again, want, rtol=0.0, atol=SMOKE_TOLERANCE, equal_nan=True))
            assert same, (
                f"{run['method']} seed {run['seed']}: the numerics changed since {committed['commit'][:8]} "
                f"({'exactly, on the same CPU' if exact else f'by more than {SMOKE_TOLERANCE}, on another CPU'}: "
                f"largest difference {np.nanmax(np.abs(again - want)):.4f}); if on purpose, rerun "
                "python benchmarks/pmnist.py --smoke (and the full benchmark) and commit the results")
    finally:
        torch.set_num_threads(threads)


def test_follow_ups_go_beyond_edges_first_then_step_then_halve_the_gaps() -> None:
    tune = benchmark_module("tune")
    grid = {"lr": [0.1, 0.2, 0.4], "decay": [0.7, 0.9], "ratio": [1.0]}
    tried = tune.configs(grid)
    winner = {"lr": 0.2, "decay": 0.9, "ratio": 1.0}
    ups = tune.follow_ups(grid, tried, winner, 10)
    # decay sits on its upper edge: the step beyond is clipped to its bound 1.0; then ratio's factor
    # either side (a STEPPED axis); then the midpoints between lr 0.2 and its neighbours, decay 0.9 and 0.7
    assert ups == [{**winner, "decay": 1.0}, {**winner, "ratio": 2.0}, {**winner, "ratio": 0.5},
                   {**winner, "lr": round(math.sqrt(0.02), 6)}, {**winner, "lr": round(math.sqrt(0.08), 6)},
                   {**winner, "decay": round(math.sqrt(0.63), 6)}]
    assert tune.follow_ups(grid, tried, winner, 2) == ups[:2]
    # never a configuration twice; a value tried by a follow-up is a neighbour too (decay 1.0)
    assert tune.follow_ups(grid, tried + ups[:3], winner, 10) == ups[3:] + [{**winner, "decay": round(math.sqrt(0.9), 6)}]
    # a winner on the lower edge of lr: one geometric step below it
    assert tune.follow_ups({"lr": [0.1, 0.2]}, [{"lr": 0.1}, {"lr": 0.2}], {"lr": 0.1}, 1) == [{"lr": 0.05}]


@pytest.mark.slow
def test_tuning_gives_every_row_the_same_total_budget(tmp_path: Path) -> None:
    tune = benchmark_module("tune")
    out = tmp_path / "tune.json"
    payload = tune.main(["--tasks", "2", "--train-per-task", "256", "--budget", "3", "--workers", "1",
                         "--out", str(out)])
    assert json.loads(out.read_text())["budget"] == payload["budget"]
    assert set(payload["budget"]) == set(tune.STAGE1) | set(tune.STAGE2)
    for name, b in payload["budget"].items():
        assert b["total"] == 3 and b["grid"] + b["follow_ups"] == 3 and b["follow_ups"] >= 1, name
        runs = [r for r in payload["runs"] if r["method"] == name]
        assert len(runs) == 3 and len({json.dumps(r["hp"], sort_keys=True) for r in runs}) == 3, name
        assert payload["best"][name]["val_avg_acc"] == max(r["val_avg_acc"] for r in runs)


def test_the_store_fisher_is_the_mean_squared_gradient_of_each_stored_records_replay_loss() -> None:
    import torch
    import torch.nn.functional as F

    from edge_sleep.bench.pmnist import mlp
    from edge_sleep.bench.strategies import store_fisher_consolidate
    from edge_sleep.config import StoreConfig, WakeConfig
    from edge_sleep.runtime import EdgeSleep

    torch.manual_seed(0)
    x, y = torch.rand(40, 784), torch.randint(0, 10, (40,))
    es = EdgeSleep(mlp(0), store=":memory:", store_config=StoreConfig(capacity_records=30),
                   wake=WakeConfig(train="all", replay_batch=0, anchor_lambda=1.0), seed=0)
    es.learn(x, y)
    assert not es.anchor
    store_fisher_consolidate(es, decay=0.5, distill_weight=1.0)
    records = es.store.read(es.store.slots())
    assert len(records.y) == 30
    expected = {n: torch.zeros_like(p) for n, p in es.model.named_parameters()}
    for i in range(30):  # the plain per-record loop: CE on the label + MSE to the stored logits
        es.model.zero_grad()
        logits = es.model(records.x[i:i + 1])
        (F.cross_entropy(logits, records.y[i:i + 1]) + F.mse_loss(logits, records.logits[i:i + 1])).backward()
        for n, p in es.model.named_parameters():
            expected[n] += p.grad ** 2 / 30
    assert set(es.anchor.fisher) == set(expected)
    for n, f in es.anchor.fisher.items():
        torch.testing.assert_close(f, expected[n], rtol=1e-4, atol=1e-9)
    store_fisher_consolidate(es, decay=0.5)  # the same weights again: 0.5 F + F
    for n, f in es.anchor.fisher.items():
        torch.testing.assert_close(f, 1.5 * expected[n], rtol=1e-4, atol=1e-9)


def test_a_cache_keeps_each_finished_run_and_a_rerun_takes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_sleep.bench.pmnist as pm

    ran: list[tuple[str, int]] = []

    def fake_worker(args: tuple[Method, int, dict[str, object]]) -> dict[str, object]:
        method, seed, _ = args
        ran.append((method.name, seed))
        return {"method": method.name, "seed": seed, "avg_acc": 0.5 + seed / 10}

    monkeypatch.setattr(pm, "_worker", fake_worker)
    methods = {m.name: m for m in default_methods(TUNED)}
    kw = {"n_tasks": 2}
    cache = tmp_path / "runs.jsonl"
    jobs = [(methods["naive"], 0), (methods["naive"], 1), (methods["derpp"], 0)]
    first = pm.run_all(jobs, 1, kw, cache=cache)
    assert ran == [("naive", 0), ("naive", 1), ("derpp", 0)] and len(cache.read_text().splitlines()) == 3
    ran.clear()
    assert sorted(map(str, pm.run_all(jobs, 1, kw, cache=cache))) == sorted(map(str, first)) and ran == []
    # a line cut short by a kill is skipped, and only its run is done again
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    pm.run_all(jobs, 1, kw, cache=cache)
    assert ran == [("derpp", 0)]
    # other settings, another protocol or other sources are other runs
    ran.clear()
    changed = dataclasses.replace(methods["naive"], wake=dataclasses.replace(methods["naive"].wake, lr=0.123))
    pm.run_all([(changed, 0)], 1, kw, cache=cache)
    pm.run_all([(methods["naive"], 0)], 1, {"n_tasks": 3}, cache=cache)
    monkeypatch.setattr("edge_sleep.bench.provenance.sources_sha256", lambda *a: "other")
    pm.run_all([(methods["naive"], 0)], 1, kw, cache=cache)
    assert ran == [("naive", 0)] * 3
