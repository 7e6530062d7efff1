"""The README is a front page: its example runs, it fits 200 lines, and every figure in it is what
the named results file says (the detailed tables are checked in tests/test_docs.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_first_python_block

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _result(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())


def _text() -> str:
    return " ".join(README.read_text().split())


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks and len(blocks[0].splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    run_first_python_block(README)


def test_readme_is_a_front_page_of_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    for page in re.findall(r"`docs/([\w\-/]+\.md)`", README.read_text()):
        assert (ROOT / "docs" / page).exists(), page
    for example in re.findall(r"`(\w+\.py)` \(", README.read_text()):
        assert (ROOT / "examples" / example).exists(), example


def test_every_headline_names_the_commit_of_its_results_file() -> None:
    rows = re.findall(r"\| `benchmarks/(\w+)\.py` \(([0-9a-f]{7})\) \|", README.read_text())
    assert len(rows) >= 8
    for name, commit in rows:
        assert _result(name)["commit"].startswith(commit), (name, commit)


def test_pmnist_headlines_are_what_the_benchmark_wrote() -> None:
    from edge_sleep.bench.metrics import paired_differences

    m = _result("pmnist")["methods"]
    text = _text()

    def acc(key: str) -> str:
        return f"{m[key]['avg_acc']:.3f} ± {m[key]['avg_acc_std']:.3f}"

    def pp(a: str, b: str) -> str:
        d = paired_differences(m[a]["per_seed_avg_acc"], m[b]["per_seed_avg_acc"])
        return f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"  # type: ignore[operator]

    assert (f"SSR {acc('ssr')}; DER++ {acc('derpp')} (at the peer's published arguments {acc('derpp_mammoth')}); DER++ "
            f"with a Fisher anchor and no night {acc('derpp_ewc')}: SSR is {pp('ssr', 'derpp_ewc')} points paired below "
            f"it (target: above every control; missed); SSR without replay by day {acc('ssr_sleep_only')}") in text
    assert m["ssr"]["avg_acc"] < m["derpp_ewc"]["avg_acc"]
    best = max(m[k]["avg_acc"] for k in m if k.startswith("ssr"))
    cost = paired_differences(m["ssr"]["per_seed_avg_acc"], m["ssr_prune"]["per_seed_avg_acc"])
    prune = f"{100 * cost['mean']:.2f} ± {100 * cost['std']:.2f}"  # type: ignore[operator]
    assert (f"without the Fisher anchor {pp('ssr_no_anchor', 'ssr')} points; without the night's replay steps "
            f"{pp('ssr_no_replay', 'ssr')}; consolidation noise, pruning, dreams and the probe: none beats its absence by "
            f"more than the paired spread (pruning costs {prune}); best sleep row {best:.3f} (target 0.92: missed); the 1:10 night stopped by the probe "
            f"{pp('ssr_1to10', 'ssr_1to10_no_probe')} over 1:10 without it") in text
    for on, off in (("ssr", "ssr_no_noise"), ("ssr_prune", "ssr"), ("ssr_dreams", "ssr"), ("ssr", "ssr_no_probe")):
        d = paired_differences(m[on]["per_seed_avg_acc"], m[off]["per_seed_avg_acc"])
        assert d["mean"] <= d["std"], (on, off)  # "none beats its absence by more than the paired spread"
    assert f"| {acc('ssr_adapters')}, below DER++ |" in text
    assert m["ssr_adapters"]["avg_acc"] < m["derpp"]["avg_acc"]


def test_privacy_latency_kernel_fisher_and_simulation_headlines() -> None:
    text = _text()
    rows = _result("privacy")["rows"]
    s8 = next(r for r in rows if r["design"] == "stats" and r["epsilon"] == 8.0)
    r8 = next(r for r in rows if r["design"] == "record" and r["epsilon"] == 8.0)
    met = s8["acc_loss_paired"] <= 3.0 and max(s8["mia_auc"], s8["store_mia_auc"]) <= 0.55
    assert (f"{s8['acc_loss_paired']:.1f} ± {s8['acc_loss_paired_std']:.1f} points below no privacy (target at most 3: "
            f"{'met' if met else 'missed'}), attack AUC {s8['mia_auc']:.3f} on the model and {s8['store_mia_auc']:.3f} "
            f"on the store; per-record noise instead: {r8['acc_loss_paired']:.1f} points") in text
    lat = _result("latency")
    assert (f"{lat['infer']['pte_speedup_vs_torch']:.1f}x faster on the MLP, "
            f"{lat['minilm']['pte_speedup_vs_torch']:.1f}x on MiniLM") in text
    dev = lat["device"]
    assert (f"{dev['wake_step_mlp']['pte_vs_eager']:.2f}x eager torch's time after a night, "
            f"{dev['wake_step_mlp_replay']['pte_vs_eager']:.2f}x with replay, "
            f"{dev['wake_step_mlp_first_day']['pte_vs_eager']:.2f}x on the first day") in text
    assert (f"{dev['night_step_mlp']['pte_vs_eager']:.2f}x eager torch's time (target at most 1.0x: met); the "
            f"night's Fisher of 32 records {dev['fisher_step_mlp']['pte_vs_eager']:.2f}x") in text
    assert dev["night_step_mlp"]["pte_vs_eager"] <= 1.0
    k = _result("kernels")["targets"]
    assert (f"at most {k['max_kernel_over_copy_at_1e7_plus']:.2f}x a `clone`, at least "
            f"{k['min_sort_over_kernel_at_1e7_plus']:.1f}x faster than a sort") in text
    f = _result("fisher_memory")
    assert f"{f['params'] / 1e6:.0f}M-parameter LLaMA" in text
    assert (f"{f['chunked_peak_mb']:.0f} MB of extra memory, {f['targets']['unchunked_over_chunked']:.0f}x below "
            "computing every per-sample gradient at once") in text
    summary = _result("simulate")["summary"]
    assert all(r["fits_memory"] for r in summary) and len({r["profile"] for r in summary}) == 5
    worst = max(r["max_battery_share"] for r in summary if r["max_battery_share"] is not None)
    assert f"at most {worst:.3%} of a phone's battery" in text


def test_the_fault_campaign_headline_is_what_the_benchmark_wrote() -> None:
    faults, before = _result("faults"), _result("faults_before")
    tries = sum(r["tries"] for r in faults["scenarios"].values())
    assert all(r["raw"] == r["silent"] == 0 for r in faults["scenarios"].values())
    failed_before = sum(1 for r in before["scenarios"].values() if r["raw"] or r["silent"])
    assert (f"no raw error and no silent loss in {tries:,} tries over {len(faults['scenarios'])} scenarios "
            f"({failed_before} of them failed before)") in _text()


def test_the_week_headline_is_what_the_benchmark_wrote() -> None:
    text = _text()
    result = _result("simulate")
    rows = result["week"]["rows"]
    spread = max(r["energy_per_step_spread"] for r in rows)
    met = [r for r in rows if r["energy_within_20pct"]]
    missed = ", ".join(_pretty(r["profile"]) for r in rows if not r["energy_within_20pct"])
    verdict = "met on every profile" if not missed else f"met on {_count(len(met))} profiles, missed on the {missed}"
    assert f"energy per replay step at most {spread:.0%} apart across the loads (target 20%: {verdict})" in text
    process = max(run["process_peak_mb"] for r in rows for run in r["runs"])
    assert f"the whole Python process ({process:.0f} MB)" in text
    over = [r["profile"] for r in rows if not all(run["process_fits_memory"] for run in r["runs"])]
    assert over == ["galaxy-a15", "iphone-15"]
    stress = _result("simulate_stress")
    kills, lost = sum(r["kills"] for r in stress["rows"]), max(r["max_lost_s"] for r in stress["rows"])
    assert lost <= stress["checkpoint_every_s"] and all(r["kills"] for r in stress["rows"])
    assert (f"a stress week's {kills} kills lost at most {lost:.1f} s of work against a "
            f"{stress['checkpoint_every_s']:g} s checkpoint interval") in text
    assert f"`benchmarks/simulate.py` ({result['commit'][:7]}; stress {stress['commit'][:7]})" in text


def _pretty(profile: str) -> str:
    return {"galaxy-a15": "Galaxy A15", "galaxy-s24": "Galaxy S24", "iphone-15": "iPhone 15",
            "jetson-orin-nano": "Jetson Orin Nano", "raspberry-pi-5": "Raspberry Pi 5"}[profile]


def _count(n: int) -> str:
    return ["no", "one", "two", "three", "four", "five"][n]


def test_the_defaults_headline_is_what_the_benchmark_wrote() -> None:
    streams = _result("defaults")["streams"]

    def pts(stream: str, row: str) -> str:
        c = streams[stream]["vs_ssr"][row]
        return f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f}"

    assert (f"`WakeConfig(train=\"all\")`: {pts('rotated', 'defaults_full')} and {pts('split', 'defaults_full')} "
            f"points (target: within 1; met); the adapters path, `WakeConfig()`: {pts('rotated', 'defaults')} on "
            f"rotated (target: within 3; met) and {pts('split', 'defaults')} on split") in _text()


def test_the_fleet_headline_is_what_the_benchmark_wrote() -> None:
    d = _result("fleet")
    r, p = d["rows"], d["paired"]
    nn, fi = p["fleet_nights-fleet_no_nights:avg_acc"], p["fleet_fisher-fleet_no_nights:avg_acc"]
    t = {k: "met" if v else "missed" for k, v in d["targets"].items()}
    assert (f"the fleet's model {r['fleet_nights']['unseen_acc']:.3f} on the tasks a phone never saw, against at best "
            f"{max(r['alone']['best_client_unseen_acc']):.3f} alone (target: above every client alone; "
            f"{t['fleet_nights_above_every_client_alone_unseen']}); nights with FedAvg {100 * nn['mean']:+.1f} ± "
            f"{100 * nn['std']:.1f} points (target: more than the seed spread; "
            f"{t['fleet_nights_above_no_nights_by_more_than_seed_spread']}), merged by the nights' Fisher "
            f"{100 * fi['mean']:+.1f} ± {100 * fi['std']:.1f}") in _text()
    share = 100 * r["fleet_nights"]["bytes_per_round"] / d["full_weights_bytes"]
    assert f"{r['fleet_nights']['bytes_per_round']:,.0f} bytes a round, {share:.1f}% of the weights" in _text()
    assert (f"at epsilon 8 the model is lost ({r['fleet_dp8']['avg_acc']:.3f}); 100 phones for 5 rounds in "
            f"{d['sim_100_clients_s']:.0f} s (target 15 min: {t['sim_100_clients_within_15_min']})") in _text()
    assert f"% of the weights (target 1/5: {t['adapters_bytes_at_most_a_fifth']})" in _text()
