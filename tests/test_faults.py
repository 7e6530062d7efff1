"""The fault campaign (benchmarks/faults.py): its JSON interface on a quick run of every scenario
(about 15 s), every try in exactly one class, and no raw or silent failure anywhere: in the quick
run, and in the committed results file of the full campaign (issue 21's target)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOP_KEYS = {"commit", "commit_dirty", "library_commit", "library_dirty", "quick", "seconds", "scenarios"}
ROW_KEYS = {"tries", "clean", "raw", "silent", "notes"}


def _faults() -> ModuleType:
    spec = importlib.util.spec_from_file_location("faults_bench", ROOT / "benchmarks" / "faults.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def faults() -> ModuleType:
    return _faults()


@pytest.fixture(scope="module")
def quick(faults: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("faults") / "faults.json"
    payload = faults.main(["--quick", "--seed", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload))
    return dict(data)


def _check_shape(data: dict[str, Any], names: list[str]) -> None:
    assert set(data) == TOP_KEYS
    assert re.fullmatch(r"[0-9a-f]{40}", str(data["commit"]))
    assert isinstance(data["commit_dirty"], bool) and isinstance(data["quick"], bool)
    assert isinstance(data["seconds"], float) and data["seconds"] >= 0
    assert list(data["scenarios"]) == names
    for name, row in data["scenarios"].items():
        extra = {"max_ratio"} if name.startswith("size_") else set()
        assert set(row) == ROW_KEYS | extra, name
        assert row["tries"] > 0 and row["tries"] == row["clean"] + row["raw"] + row["silent"], (name, row)
        assert all(isinstance(row[k], int) and row[k] >= 0 for k in ("tries", "clean", "raw", "silent"))
        assert isinstance(row["notes"], list) and len(row["notes"]) <= 5
        assert all(isinstance(n, str) and n for n in row["notes"])
        if row["raw"] + row["silent"]:
            assert row["notes"], f"{name} failed without saying how"
        if extra:
            assert isinstance(row["max_ratio"], float) and row["max_ratio"] > 0


def test_quick_run_writes_the_documented_json(quick: dict[str, Any]) -> None:
    assert quick["quick"] is True
    _check_shape(quick, list(_faults().SCENARIOS))


def test_the_results_file_has_every_scenario(faults: ModuleType) -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "faults.json").read_text())
    _check_shape(data, list(faults.SCENARIOS))


def test_the_classifier_puts_each_try_in_one_class(faults: ModuleType) -> None:
    from edge_sleep.errors import StoreBusyError

    assert faults.from_error(StoreBusyError("busy"), "open").kind == "clean"
    assert faults.from_error(AttributeError("_db"), "open").kind == "raw"
    assert faults.worst([faults.clean(), faults.silent("lost"), faults.raw("boom")]).kind == "raw"
    assert faults.worst([faults.clean(), faults.silent("lost")]).kind == "silent"
    ok = faults.classify_cli("x", 2, "usage: ...\nedge-sleep: error: --tasks=0; expected >= 1\n", ["--tasks"])
    assert ok.kind == "clean"
    assert faults.classify_cli("x", 2, "edge-sleep: something\n", ["/a/path"]).kind == "raw"
    assert faults.classify_cli("x", 1, "Traceback (most recent call last):\n  ...\nOSError: x\n", ["x"]).kind == "raw"
    assert faults.classify_cli("x", 0, "", ["x"]).kind == "silent"
    row = faults.summarize([faults.clean(), faults.raw("a 1"), faults.raw("a 2"), faults.silent("b", 2.0)])
    assert row == {"tries": 4, "clean": 1, "raw": 2, "silent": 1, "notes": ["a 1", "b"], "max_ratio": 2.0}


def test_no_scenario_has_a_raw_or_silent_failure(quick: dict[str, Any]) -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "faults.json").read_text())
    assert data["quick"] is False  # the committed file is the full campaign
    for run in (quick, data):
        failed = {name: row for name, row in run["scenarios"].items() if row["raw"] or row["silent"]}
        assert not failed, failed
        sizes = {name: run["scenarios"][name]["max_ratio"] for name in ("size_open", "size_closed")}
        assert sizes["size_open"] <= 1.1 and sizes["size_closed"] <= 1.0, sizes


def test_the_benchmarks_page_quotes_the_results_file() -> None:
    data = json.loads((ROOT / "benchmarks" / "results" / "faults.json").read_text())
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", page, flags=re.M))
    assert list(rows) == list(data["scenarios"]), "docs/benchmarks.md's fault table lists other scenarios"
    for name, row in data["scenarios"].items():
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[:4] == [f"{row[k]:,}" for k in ("tries", "clean", "raw", "silent")], (name, cells)
    assert data["commit"][:7] in page
    store = " ".join((ROOT / "docs" / "store.md").read_text().split())
    ratios = {name: data["scenarios"][name]["max_ratio"] for name in ("size_open", "size_closed", "size_large_append")}
    assert f"appends of 256 records into the same 1 MB store reach about {ratios['size_large_append']:.1f}x" in store
    before = json.loads((ROOT / "benchmarks" / "results" / "faults_before.json").read_text())
    assert before["library_commit"].startswith("527aaed") and list(before["scenarios"]) == list(data["scenarios"])
    bad = [(n, r) for n, r in before["scenarios"].items() if r["raw"] or r["silent"]]
    parts = ["`{}` {} of {}".format(n, " and ".join(f"{r[k]} {k}" for k in ("raw", "silent") if r[k]), r["tries"])
             for n, r in bad]
    said = f"found failures in {len(bad)} of its {len(before['scenarios'])} scenarios: " + "; ".join(parts)
    assert said in " ".join(page.split())
