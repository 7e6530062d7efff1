from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sleep.config import StoreConfig
from edge_sleep.errors import (CorruptRecordError, FingerprintMismatchError, FormatVersionError,
                               InputError, StoreError, StorePathError)
from edge_sleep.store import ReplayStore
from edge_sleep.store import budget
from edge_sleep.store import database as sql


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
    store = make(tmp_path, capacity_mb=0.1)  # 100 kB with 4 KiB pages; a row is 100 + 2*4 + 64 + 92 bytes
    store.append(torch.rand(500, 100), torch.zeros(500, dtype=torch.long), torch.randn(500, 4))
    row = budget.row_bytes(100, 4, 64, sealed=False)
    assert store.capacity_records == budget.capacity_for(0.1, row, 4096) and len(store) == store.capacity_records
    assert store.bytes_used() <= 110_000  # open: the log holds the batch's transaction until its checkpoint
    store.close()
    assert sum(p.stat().st_size for p in tmp_path.glob("r.db*")) <= 100_000


def test_a_budget_too_small_for_the_fixed_bytes_says_so(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_mb=0.01)
    with pytest.raises(InputError, match="capacity_mb=0.01 leaves no room .*Fix: raise capacity_mb"):
        store.append(torch.rand(5, 100), torch.zeros(5, dtype=torch.long))
    assert len(store) == 0


@pytest.mark.parametrize("case", ["mnist", "long_tags_small_rows", "encrypted", "integer_tokens"])
def test_the_files_stay_within_the_budget_open_and_closed(tmp_path: Path, case: str) -> None:
    """Issue 21: with capacity_mb=1 the files reached 17.6 MB open and 1.1-1.6x closed."""
    width, stream, key = {"mnist": (784, "", None), "long_tags_small_rows": (16, "t" * 200, None),
                          "encrypted": (784, "task-a", bytes(range(32))), "integer_tokens": (64, "", None)}[case]
    store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_mb=1.0), seed=0, key=key)

    def files() -> int:
        return sum(p.stat().st_size for p in tmp_path.glob("r.db*"))  # with -wal, -shm, -witness, -lock

    peak = 0
    for _ in range(150):
        x = torch.randint(0, 30000, (32, width)) if case == "integer_tokens" else torch.rand(32, width)
        store.append(x, torch.randint(0, 10, (32,)), torch.randn(32, 10), stream=stream)
        peak = max(peak, files())
        assert store.bytes_used() == files()
    assert len(store) == store.capacity_records  # full: the budget is used, not just kept
    store.close()
    assert peak <= 1.1e6 and files() <= 1.0e6, (peak, files())


def test_an_append_too_large_for_the_logs_share_warns_with_the_batch_that_fits(tmp_path: Path) -> None:
    """An append is one transaction: once the store is full its records replace others on pages all
    over the file, and the log holds every one of them until the checkpoint (issue 21)."""
    import re

    def run(folder: Path, batch: int) -> tuple[int, list[str]]:
        folder.mkdir()
        store = ReplayStore(folder / "r.db", StoreConfig(capacity_mb=1.0), seed=0)
        peak, said = 0, []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while store.seen < 3 * (store.capacity_records or batch):
                store.append(torch.rand(batch, 784), torch.randint(0, 10, (batch,)), torch.randn(batch, 10))
                peak = max(peak, sum(p.stat().st_size for p in folder.glob("r.db*")))
        store.close()
        return peak, [str(w.message) for w in caught if "write-ahead log holds" in str(w.message)]

    peak, said = run(tmp_path / "large", 256)
    assert len(said) == 1 and "keeps 256 records" in said[0] and "capacity_mb=1.0" in said[0], said
    assert peak > 1.1e6  # what the warning is about: the log holds the whole transaction
    fits = int(re.search(r"batches of at most (\d+) records", said[0]).group(1))
    assert 4 <= fits < 256
    peak, said = run(tmp_path / "fits", fits)
    assert said == [] and peak <= 1.0e6, (fits, peak, said)


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
    sql.set_meta(db, "format_version", 99)  # as a newer edge-sleep writes it: with its row checksum
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


@pytest.mark.parametrize("change", [
    "label=7", "scale=scale*2", "zero_point=zero_point+1", "stream='other'", "slot=slot+100",
    "codes=X'00'", "logits=X'0000'", "dp_epsilon=1.0", "checksum=checksum+1",
])
def test_a_damaged_record_is_quarantined_and_the_rest_stay_usable(tmp_path: Path, change: str) -> None:
    store = make(tmp_path, capacity_records=8)
    store.append(torch.rand(3, 3), torch.zeros(3, dtype=torch.long), torch.randn(3, 2), stream="s")
    kept = store.read(np.array([0, 2]))
    store.close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute(f"UPDATE records SET {change} WHERE slot=1")
    db.commit()
    db.close()
    with pytest.warns(RuntimeWarning, match="1 damaged record"):
        store = make(tmp_path, capacity_records=8)
    assert len(store) == 2 and sorted(store.slots().tolist()) == [0, 2]
    torch.testing.assert_close(store.read(np.array([0, 2])).x, kept.x)
    reason = sqlite3.connect(tmp_path / "r.db").execute("SELECT reason FROM quarantine").fetchall()
    assert len(reason) == 1 and reason[0][0]
    # the hole is reused: a new record takes slot 1 and replaces nothing
    store.append(torch.rand(1, 3), torch.ones(1, dtype=torch.long), torch.randn(1, 2))
    assert sorted(store.slots().tolist()) == [0, 1, 2]
    torch.testing.assert_close(store.read(np.array([0, 2])).x, kept.x)
    store.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quarantined once: the next open is clean
        assert len(make(tmp_path, capacity_records=8)) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty_file", "bad_meta_no_witness"])
def test_a_damaged_file_is_a_store_error_never_a_raw_one(tmp_path: Path, damage: str) -> None:
    store = make(tmp_path, capacity_records=8)
    store.append(torch.rand(3, 3), torch.zeros(3, dtype=torch.long))
    store.close()
    path = tmp_path / "r.db"
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "empty_file":
        path.write_bytes(b"")
    else:  # the layout is lost and no witness holds it: the records cannot be decoded
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value='{not json' WHERE key='layout'")
        db.commit()
        db.close()
        Path(f"{path}-witness").unlink()
    with pytest.raises(StoreError) as e:
        make(tmp_path, capacity_records=8)
    assert "Fix:" in str(e.value) and "r.db" in str(e.value)
    make(tmp_path / "fresh", capacity_records=8).close()  # nothing left locked in this process
    path.unlink()  # the fix the message names: a new store at the same path
    assert len(make(tmp_path, capacity_records=8)) == 0


def test_a_damaged_wal_frame_recovers_the_last_complete_transactions(tmp_path: Path) -> None:
    """A crash with a damaged write-ahead log: SQLite drops the damaged frame and what follows,
    and the store says so, from its witness (issue 21: 100 of 100 such crashes lost records silently)."""
    import shutil

    store = make(tmp_path, capacity_records=64)
    for i in range(6):
        store.append(torch.rand(4, 3), torch.full((4,), i, dtype=torch.long))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    # the files as a crash leaves them: the WAL not yet checkpointed into the database
    for suffix in ("", "-wal", "-witness"):
        shutil.copyfile(str(tmp_path / "r.db") + suffix, str(crashed / "r.db") + suffix)
    store.close()
    wal = crashed / "r.db-wal"
    raw = bytearray(wal.read_bytes())
    assert len(raw) > 8192
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle of the log
    wal.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=r"behind its witness, \d committed write\(s\) are missing: records held "
                      r"24 -> \d+, records offered 24 -> \d+") as said:
        recovered = ReplayStore(crashed / "r.db", StoreConfig(capacity_records=64), fingerprint="abc", seed=0)
    assert len(said) == 1
    # a prefix of the appends survives, every survivor verifies, nothing is half-written
    assert len(recovered) % 4 == 0 and len(recovered) < 24
    # the stream length stays what was offered (the reservoir keeps counting from there)
    assert recovered.seen == 24
    if len(recovered):
        labels = recovered.read(recovered.slots()).y.tolist()
        assert labels == sorted(labels) and labels == [i for i in range(len(recovered) // 4) for _ in range(4)]
    recovered.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the witness now agrees with the database
        ReplayStore(crashed / "r.db", StoreConfig(capacity_records=64), fingerprint="abc", seed=0).close()


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
    import edge_sleep.store.replay as store_mod

    store = make(tmp_path, capacity_records=10)
    store.append(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))
    before = store.read(np.arange(4))
    calls = {"n": 0}
    real = store_mod.checksum

    def failing(*args: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "checksum", failing)
    with pytest.raises(OSError, match="disk full"):
        store.append(torch.rand(5, 3), torch.ones(5, dtype=torch.long))
    monkeypatch.undo()
    assert len(store) == 4 and store.seen == 4
    store.close()
    reopened = make(tmp_path, capacity_records=10)
    assert len(reopened) == 4 and reopened.seen == 4
    torch.testing.assert_close(reopened.read(np.arange(4)).x, before.x)


def test_seen_is_durable_when_a_batch_keeps_no_record(tmp_path: Path) -> None:
    """A crash right after a batch the reservoir dropped must not lose that batch's count."""
    import sqlite3

    store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=2), seed=0)
    store.append(torch.rand(2, 3), torch.arange(2))
    dropped = 0
    for _ in range(200):
        if store.append(torch.rand(1, 3), torch.zeros(1, dtype=torch.long)) == 0:
            dropped += 1
            break
    assert dropped == 1
    # read by another connection, as a process that reopens the file after a crash would
    on_disk = sqlite3.connect(tmp_path / "r.db").execute("SELECT value FROM meta WHERE key='seen'").fetchone()
    assert int(on_disk[0]) == store.seen
    store.close()


def test_load_validates_the_state_before_changing_the_model(tmp_path: Path) -> None:
    from edge_sleep import EdgeSleep, WakeConfig
    from edge_sleep.errors import ConfigError
    from tests.conftest import small_mlp

    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", wake=WakeConfig(train="adapters", replay_batch=0))
    es.learn(torch.rand(8, 8), torch.randint(0, 3, (8,)))
    ckpt = es.save(tmp_path / "ckpt")
    es.store.close()
    # a model of another architecture: refused before adapters are attached or the store opens
    other = small_mlp(hidden=32)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ConfigError, match="fingerprint"):
        EdgeSleep.load(ckpt, other)
    assert {n for n, _ in other.named_parameters()} == set(before)  # no lora_a / lora_b
    assert all(p.requires_grad for p in other.parameters())
    again = EdgeSleep.load(ckpt, small_mlp())  # the store was not left locked
    # a state whose tensors do not fit: nothing is copied, every problem is listed
    state = again.state_dict()
    weights = {n: p.detach().clone() for n, p in again.model.named_parameters()}
    bad = {**state, "model": {**state["model"], "0.weight": torch.zeros(5, 5)},
           "masks": {"nope.weight": torch.ones(2, dtype=torch.bool)}}
    bad["model"].pop("4.bias")
    with pytest.raises(ConfigError) as e:
        again.load_state_dict(bad)
    assert len(e.value.problems) == 4  # missing, shape, unknown mask name, and the fix
    assert all(torch.equal(weights[n], p) for n, p in again.model.named_parameters())
    again.store.close()


def test_bad_noise_layers_leave_the_model_and_store_untouched(tmp_path: Path) -> None:
    from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
    from edge_sleep.errors import ConfigError
    from tests.conftest import small_mlp

    model = small_mlp()
    with pytest.raises(ConfigError, match="noise_layers"):
        EdgeSleep(model, store=tmp_path / "r.db", wake=WakeConfig(train="adapters"),
                  sleep=SleepConfig(noise_layers=("no_such_layer",)))
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert not (tmp_path / "r.db").exists()


def test_a_streams_records_can_be_deleted_and_leave_no_trace_on_disk(tmp_path: Path) -> None:
    marker = 0x5EC12E7_0DDBA11  # an int64 kept exactly (integer latents are stored as they are)
    store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=20), seed=0)
    store.append(torch.full((4, 3), marker), torch.zeros(4, dtype=torch.long), stream="bob")
    store.append(torch.arange(18).reshape(6, 3), torch.ones(6, dtype=torch.long), stream="alice")
    store.checkpoint()

    def on_disk() -> bool:
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("r.db") and p.is_file())
        return marker.to_bytes(8, "little") in raw

    assert on_disk()
    bob = store.stream_slots("bob")
    assert bob.tolist() == [0, 1, 2, 3] and len(store.stream_slots("nobody")) == 0
    with pytest.raises(InputError, match="delete got slots"):
        store.delete([0, 99])  # validated first: nothing deleted
    assert len(store) == 10
    assert store.delete(bob) == 4 and store.delete(bob) == 0
    assert len(store) == 6 and not on_disk()  # secure_delete and a checkpoint: gone from both files
    assert set(store.sample(6).y.tolist()) == {1}
    where = store.offer(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), stream="carol")
    assert where.tolist() == [0, 1]  # the freed slots are taken first
    store.close()
    again = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=20), seed=0)
    assert len(again) == 8 and len(again.stream_slots("bob")) == 0 and again.stream_slots("carol").tolist() == [0, 1]
    again.close()


def test_forgetting_a_stream_also_empties_the_quarantine(tmp_path: Path) -> None:
    """Issue 20, item 5: a quarantined record's plaintext stayed after its stream was deleted."""
    marker = 0x5EC12E7_0DDBA11
    store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=20), seed=0)
    store.append(torch.full((4, 3), marker), torch.zeros(4, dtype=torch.long), stream="bob")
    store.append(torch.arange(18).reshape(6, 3), torch.ones(6, dtype=torch.long), stream="alice")
    store.close()
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("UPDATE records SET label=7 WHERE slot=0")  # bob's first record no longer matches its CRC
    db.commit()
    db.close()

    def on_disk() -> bool:
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("r.db") and p.is_file())
        return marker.to_bytes(8, "little") in raw

    with pytest.warns(RuntimeWarning, match="quarantine"):
        store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=20), seed=0)
    assert store.stream_slots("bob").tolist() == [1, 2, 3]
    with pytest.raises(InputError, match="forget got stream=3"):
        store.forget(3)  # type: ignore[arg-type]
    assert store.delete(store.stream_slots("bob")) == 3 and on_disk()  # the quarantined copy is still there
    assert store.forget("bob") == 0 and not on_disk()
    assert len(store) == 6 and store.forget("nobody") == 0
    assert sqlite3.connect(tmp_path / "r.db").execute("SELECT COUNT(*) FROM quarantine").fetchone() == (0,)
    store.close()


def _flip_in_file(path: Path, needle: bytes, which: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    at = [i for i in range(len(raw)) if raw.startswith(needle, i)]
    assert at, needle
    for i in at if which < 0 else [at[which % len(at)]]:
        raw[i + bit // 8 % len(needle)] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("needle", [b"capacity_records", b"layout", b"seen", b"format_version", b"fingerprint",
                                    b'"latent_kind"', b"200"])
@pytest.mark.parametrize("where", [0, 1, -1])  # the table's copy, the index's copy (keys), every copy
def test_one_flipped_bit_in_the_metadata_never_opens_a_store_emptier(tmp_path: Path, needle: bytes, where: int) -> None:
    """Issue 21: flipping one bit of the key capacity_records opened a 200-record store empty,
    and the next append overwrote records; now a damaged row comes back from the witness."""
    store = make(tmp_path, capacity_records=200)
    x = torch.rand(300, 3)
    store.append(x, torch.arange(300) % 5)
    held, seen, slots = len(store), store.seen, store.slots()
    before = store.read(slots)
    store.close()
    _flip_in_file(tmp_path / "r.db", needle, where, bit=13)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            again = make(tmp_path, capacity_records=200)
        except StoreError as e:  # refused with its reason is clean too (a flip in a page's structure)
            assert "Fix:" in str(e)
            return
    assert (len(again), again.seen, again.capacity_records) == (held, seen, 200), [str(w.message) for w in said]
    after = again.read(again.slots())
    torch.testing.assert_close(after.x, before.x)
    again.append(torch.rand(1, 3), torch.zeros(1, dtype=torch.long))
    assert len(again) == held and again.seen == seen + 1
    again.close()


def test_damaged_metadata_without_a_witness_is_refused_not_emptied(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=200)
    store.append(torch.rand(50, 3), torch.arange(50) % 5)
    store.close()
    Path(f"{tmp_path / 'r.db'}-witness").unlink()
    _flip_in_file(tmp_path / "r.db", b"capacity_records", 0, bit=3)
    with pytest.raises(StoreError, match="capacity_records cannot be recovered .*50 records"):
        make(tmp_path, capacity_records=200)


def test_a_store_lost_in_its_first_session_says_so(tmp_path: Path) -> None:
    """Issue 21: a store that crashed in its first session came back empty 9 times in 50, silently."""
    import shutil

    store = make(tmp_path, capacity_records=64)
    for i in range(3):
        store.append(torch.rand(4, 3), torch.full((4,), i, dtype=torch.long))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-witness"):  # the log was lost whole: the database file has no table yet
        shutil.copyfile(str(tmp_path / "r.db") + suffix, str(crashed / "r.db") + suffix)
    store.close()
    with pytest.warns(RuntimeWarning, match="records held 12 -> 0, records offered 12 -> 0"):
        again = ReplayStore(crashed / "r.db", StoreConfig(capacity_records=64), fingerprint="abc", seed=0)
    assert len(again) == 0 and again.seen == 12
    again.close()


def test_a_deleted_store_starts_anew_despite_the_witness_it_left(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=8)
    store.append(torch.rand(3, 3), torch.zeros(3, dtype=torch.long))
    store.close()
    (tmp_path / "r.db").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=8), fingerprint="other")
    assert len(fresh) == 0 and fresh.seen == 0
    fresh.close()


def test_a_row_far_outside_the_stores_range_is_stored_with_one_warning(tmp_path: Path) -> None:
    """Issue 21: raw 0-255 pixels among [0, 1] inputs were stored without a word."""
    store = make(tmp_path, capacity_records=100)
    store.append(torch.rand(40, 3), torch.zeros(40, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.append(torch.rand(4, 3) * 10, torch.zeros(4, dtype=torch.long))  # 10x: not far out
    big = torch.rand(4, 3)
    big[2] *= 255
    with pytest.warns(RuntimeWarning, match="row 2 of this batch reaches .*pixels / 255"):
        store.append(big, torch.zeros(4, dtype=torch.long))
    assert len(store) == 48
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per store
        store.append(big, torch.zeros(4, dtype=torch.long))
    store.close()


def test_a_format_2_file_gains_metadata_checksums(tmp_path: Path) -> None:
    store = make(tmp_path, capacity_records=8)
    store.append(torch.rand(3, 3), torch.zeros(3, dtype=torch.long))
    store.close()
    db = sqlite3.connect(tmp_path / "r.db")  # back to format 2: no checksum column
    db.execute("ALTER TABLE meta DROP COLUMN checksum")
    db.execute("UPDATE meta SET value='2' WHERE key='format_version'")
    db.commit()
    db.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = make(tmp_path, capacity_records=8)
    assert len(again) == 3
    again.close()
    db = sqlite3.connect(tmp_path / "r.db")
    rows = db.execute("SELECT key, value, checksum FROM meta").fetchall()
    db.close()
    assert ("format_version", "3") in [(k, v) for k, v, _ in rows]
    assert all(c == sql.meta_checksum(k, v) for k, v, c in rows)
