"""The README's Python example runs as written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _benchmark(name: str) -> tuple[Any, dict[str, Any]]:
    """``benchmarks/<name>.py`` as a module, and what it wrote to ``benchmarks/results/<name>.json``."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", README.parent / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench, json.loads((README.parent / "benchmarks" / "results" / f"{name}.json").read_text())


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["labels"].shape == (5,)  # type: ignore[attr-defined]
    assert namespace["report"].completed  # type: ignore[attr-defined]
    assert os.path.exists("replay.db") and os.path.isdir("ckpt")


def test_readme_latency_table_is_what_the_benchmark_wrote() -> None:
    import json

    result = json.loads((README.parent / "benchmarks" / "results" / "latency.json").read_text())
    text = README.read_text()
    keys = ("torch_us", "torch_folded_us", "pte_us", "pte_raw_us", "pte_int8_us", "onnx_us")
    for label, row in (("P-MNIST MLP + LoRA r8", result["infer"]), ("MiniLM-L6 + LoRA r8, 32 tokens", result["minilm"])):
        cells = "".join(f" {row[k]:,.0f} µs |" for k in keys)
        assert f"| {label} |{cells}" in text, label
    assert f"{result['infer']['pte_speedup_vs_torch']:.1f}x faster than eager torch" in text
    assert f"{result['train_step']['pte_us']:,.0f} µs through `train.pte`" in text


def test_readme_kernel_table_is_what_the_benchmark_wrote() -> None:
    bench, result = _benchmark("kernels")
    text = README.read_text()
    assert bench.markdown_table(result) in text
    t = result["targets"]
    assert f"at most {t['max_kernel_over_copy_at_1e7_plus']:.2f}x a\n`clone`" in text
    assert f"at least {t['min_sort_over_kernel_at_1e7_plus']:.1f}x faster than the sort" in text
    assert f"{t['max_kernel_over_copy_into_at_1e7_plus']:.1f}x; the histogram" in text


def test_readme_fisher_memory_figures_are_what_the_benchmark_wrote() -> None:
    import json

    r = json.loads((README.parent / "benchmarks" / "results" / "fisher_memory.json").read_text())
    text = README.read_text()
    assert f"| {r['unchunked_peak_mb']:,.0f} MB | {r['unchunked_samples_s']:.2f} |" in text
    assert f"| {r['chunked_peak_mb']:,.0f} MB | {r['chunked_samples_s']:.2f} |" in text
    assert f"| {r['chunked_keep_peak_mb']:,.0f} MB | {r['chunked_keep_samples_s']:.2f} |" in text
    assert f"Its measured peak is {r['chunked_peak_mb']:.0f} MB, {r['targets']['chunked_over_bound']:.2f}x the bound" in text
    assert f"It is {r['targets']['unchunked_over_chunked']:.0f}x below the unchunked path" in text


def test_readme_simulation_tables_are_what_the_benchmark_and_profiles_say() -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("simulate_bench", README.parent / "benchmarks" / "simulate.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = json.loads((README.parent / "benchmarks" / "results" / "simulate.json").read_text())
    text = README.read_text()
    assert bench.markdown_table(result["summary"]) in text
    assert bench.profile_table() in text
    slowest = max(r["max_wall_s"] for r in result["summary"])
    assert f"the slowest 3-day run took {slowest:.0f} s here" in text


def test_readme_store_figures_are_what_the_benchmark_wrote() -> None:
    import json

    r = json.loads((README.parent / "benchmarks" / "results" / "store.json").read_text())
    text = " ".join(README.read_text().split())
    assert f"{r['appends_per_s_batched']:,.0f} appends/s in batches of 128" in text
    assert f"{r['appends_per_s_encrypted']:,.0f} appends/s ({r['encryption_cost_x']:.2f}x the plain time" in text
    assert f"({r['size_ratio_vs_fp32']:.2f}x smaller" in text


def test_readme_privacy_table_is_what_the_benchmark_wrote() -> None:
    bench, result = _benchmark("privacy")
    assert bench.markdown_table(result) in README.read_text()
    text = " ".join(README.read_text().split())
    none, at8 = result["rows"][0], next(r for r in result["rows"] if r["epsilon"] == 8)
    assert f"calibrated attack finds the store's examples (AUC {none['mia_auc']:.3f}, TPR {none['tpr_at_1pct_fpr']:.3f}" in text
    assert f"the attack is at chance (AUC {at8['mia_auc']:.3f}; target at most 0.55: met)" in text
    assert f"accuracy falls by {at8['acc_loss_points']:.1f} points (target at most 3: **missed**)" in text
