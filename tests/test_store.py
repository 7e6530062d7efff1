from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sleep.config import StoreConfig
from edge_sleep.errors import (CorruptRecordError, FingerprintMismatchError, FormatVersionError,
                               InputError, StoreError, StorePathError)
from edge_sleep.store import ReplayStore


def make(tmp_path: Path, **kw: object) -> ReplayStore:
    return ReplayStore(tmp_path / "r.db", StoreConfig(**kw), fingerprint="abc", seed=0)  # type: ignore[arg-type]


def test_round_trip_keeps_labels_logits_and_latents(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=100)
    x, y, z = torch.rand(20, 2, 5), torch.arange(20) % 4, torch.randn(20, 4)
    assert store.append(x, y, z, stream="t0") == 20
    batch = store.read(np.arange(20))
    assert batch.x.shape == (20, 2, 5)
    assert torch.equal(batch.y, y)
    torch.testing.assert_close(batch.logits, z.half().float())
    assert (batch.x - x).abs().max() <= 1.0 / 255 / 2 + 1e-6  # half an int8 step of a [0,1] row
    store.close()
    reopened = make(tmp_path, capacity_records=100)
    assert len(reopened) == 20 and reopened.seen == 20
    torch.testing.assert_close(reopened.read(np.arange(20)).x, batch.x)


def test_integer_latents_are_stored_exactly(tmp_path: Path) -> None:
    store = make(tmp_path)
    ids = torch.randint(0, 50000, (6, 9))
    store.append(ids, torch.zeros(6, dtype=torch.long))
    assert torch.equal(store.read(np.arange(6)).x, ids)


def test_reservoir_keeps_capacity_and_a_uniform_sample(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=200)
    for t in range(10):  # 10 streams of 1000 records each
        store.append(torch.rand(1000, 4), torch.full((1000,), t))
    assert len(store) == 200 and store.seen == 10000
    counts = np.bincount(store.read(np.arange(200)).y.numpy(), minlength=10)
    assert counts.min() >= 8 and counts.max() <= 35  # 20 expected per stream


def test_class_balanced_eviction_balances(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=40, eviction="class_balanced")
    for _ in range(10):
        y = torch.where(torch.rand(100) < 0.9, 0, torch.randint(1, 4, (100,)))
        store.append(torch.rand(100, 3), y)
    counts = store.class_counts()
    assert len(store) == 40 and max(counts.values()) - min(counts.values()) <= 1


def test_capacity_in_bytes(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_mb=0.01)  # 10 kB; a record is 100 + 2*4 + 32 bytes
    store.append(torch.rand(500, 100), torch.zeros(500, dtype=torch.long), torch.randn(500, 4))
    assert store.capacity_records == 10_000 // 140 and len(store) == store.capacity_records
    assert store.bytes_used() <= 10_000


def test_balanced_sampling_draws_rare_classes(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=100)
    store.append(torch.rand(100, 2), torch.tensor([0] * 95 + [1] * 5))
    drawn = torch.cat([store.sample(10, balanced=True).y for _ in range(50)])
    assert 0.3 < drawn.float().mean() < 0.7


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    make(tmp_path).close()
    with pytest.raises(FingerprintMismatchError, match="abc"):
        ReplayStore(tmp_path / "r.db", fingerprint="other")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    make(tmp_path).close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("UPDATE meta SET value='99' WHERE key='format_version'")
    db.commit()
    db.close()
    with pytest.raises(FormatVersionError, match="99"):
        make(tmp_path)


def test_unwritable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorePathError, match="file/sub"):
        ReplayStore(tmp_path / "file" / "sub" / "r.db")


def test_bad_input_leaves_store_untouched(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=10)
    store.append(torch.rand(5, 3), torch.zeros(5, dtype=torch.long))
    before = store.read(np.arange(5))
    with pytest.raises(InputError, match="non-finite"):
        store.append(torch.tensor([[1.0, float("nan"), 0.0]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(InputError, match="layout"):
        store.append(torch.rand(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="labels"):
        store.append(torch.rand(2, 3), torch.zeros(3, dtype=torch.long))
    assert len(store) == 5 and store.seen == 5
    torch.testing.assert_close(store.read(np.arange(5)).x, before.x)


def test_corrupt_record_is_detected(tmp_path: Path) -> None:
    store = make(tmp_path)
    store.append(torch.rand(3, 3), torch.zeros(3, dtype=torch.long))
    store.close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("UPDATE records SET label=7 WHERE slot=1")
    db.commit()
    db.close()
    with pytest.raises(CorruptRecordError, match="slot 1"):
        make(tmp_path)


def test_empty_store_cannot_be_sampled(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="empty"):
        make(tmp_path).sample(3)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=50)
    store.append(torch.rand(50, 2), torch.zeros(50, dtype=torch.long))
    state = store.state_dict()
    a = store.sample(5).slots
    store.load_state_dict(state)
    assert np.array_equal(store.sample(5).slots, a)
    with pytest.raises(FormatVersionError):
        store.load_state_dict({**state, "format_version": 2})


def test_a_failure_mid_append_rolls_the_whole_batch_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_sleep.store as store_mod

    store = make(tmp_path, capacity_records=10)
    store.append(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))
    before = store.read(np.arange(4))
    calls = {"n": 0}
    real = store_mod._checksum

    def failing(*args: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "_checksum", failing)
    with pytest.raises(OSError, match="disk full"):
        store.append(torch.rand(5, 3), torch.ones(5, dtype=torch.long))
    monkeypatch.undo()
    assert len(store) == 4 and store.seen == 4
    store.close()
    reopened = make(tmp_path, capacity_records=10)
    assert len(reopened) == 4 and reopened.seen == 4
    torch.testing.assert_close(reopened.read(np.arange(4)).x, before.x)
