"""The untuned streams of issue 22 (items 4 and 5): Split MNIST, the stream dispatcher, and
``benchmarks/defaults.py`` on a tiny stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_sleep import SleepConfig, WakeConfig
from edge_sleep.bench.datasets import digit_stream, load_mnist, split_mnist
from tests.conftest import benchmark_module


def test_split_mnist_is_class_incremental_with_disjoint_digits() -> None:
    tasks = split_mnist(5, seed=3, train_per_task=300, test_per_task=200)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    _, ytr, _, yte = load_mnist()
    for t in tasks:
        x, y = next(t.batches(128))
        assert x.shape == (128, 784) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        assert set(ytr[t.order].tolist()) == set(t.classes) and t.order.numel() == 300
        ex, ey = t.evaluation()
        assert ex.shape == (200, 784) and set(ey.tolist()) <= set(t.classes) and torch.equal(ey, yte[t.eval_index])
    # the seed orders the images; the digits stay
    other = split_mnist(5, seed=4, train_per_task=300)
    assert not torch.equal(other[0].order, tasks[0].order) and other[0].classes == tasks[0].classes


def test_digit_stream_names_each_stream_and_refuses_a_validation_split_it_lacks() -> None:
    assert [t.name for t in digit_stream("split", 2, 0, train_per_task=10)] == ["digits01", "digits23"]
    assert len(digit_stream("rotated", 3, 0, train_per_task=10)) == 3
    assert digit_stream("pmnist", 2, 0, split="validation", train_per_task=10)[0].split == "validation"
    with pytest.raises(ValueError, match="stream='fashion'; expected one of"):
        digit_stream("fashion", 2, 0)
    with pytest.raises(ValueError, match="only 'pmnist' has a validation split"):
        digit_stream("rotated", 2, 0, split="validation")
    with pytest.raises(ValueError, match="n_tasks=6"):
        split_mnist(6, 0)


def test_the_defaults_rows_are_untouched_and_the_benchmark_writes_its_json(tmp_path: Path) -> None:
    defaults = benchmark_module("defaults")
    rows = {m.name: m for m in defaults.methods()}
    assert list(rows) == ["naive", "ssr", "defaults_full", "defaults", "defaults_full_before", "defaults_before"]
    assert rows["defaults_before"].wake == WakeConfig(lr=0.1, anchor_lambda=10.0)
    assert rows["defaults"].wake == WakeConfig() and rows["defaults"].sleep == SleepConfig()
    assert rows["defaults_full"].wake == WakeConfig(train="all") and rows["defaults_full"].sleep == SleepConfig()
    assert {(m.pretrain_lr, m.pretrain_passes) for m in rows.values()} == {(0.1, 3)}  # one base for every row

    out = tmp_path / "defaults.json"
    payload = defaults.main(["--tasks", "2", "--train-per-task", "256", "--seeds", "0", "1", "--workers", "1",
                             "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload)) and out.with_suffix(".png").stat().st_size > 0
    assert set(data["streams"]) == {"rotated", "split"} and data["seeds"] == [0, 1] and "commit" in data
    for stream in data["streams"].values():
        assert list(stream["rows"]) == list(rows) and stream["tasks"] == 2
        assert set(stream["vs_ssr"]) == set(rows) - {"ssr"}
        assert "within_target" not in stream["vs_ssr"]["naive"]
        for name, target in (("defaults_full", 0.01), ("defaults", 0.03)):
            c = stream["vs_ssr"][name]
            per_seed = [a - b for a, b in zip(stream["rows"][name]["per_seed_avg_acc"],
                                              stream["rows"]["ssr"]["per_seed_avg_acc"])]
            assert c["diffs"] == pytest.approx(per_seed, abs=1e-6) and c["allowed_shortfall"] == target
            assert c["within_target"] == (c["mean"] >= -target)
