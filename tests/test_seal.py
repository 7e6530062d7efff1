"""Encryption at rest: unreadable without the key, a wrong key is a clear error, files are the owner's."""

from __future__ import annotations

import os
import sqlite3
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_sleep import EdgeSleep, StoreConfig, WakeConfig
from edge_sleep.errors import ConfigError, StoreKeyError
from edge_sleep.store import ReplayStore
from edge_sleep.store.codec import checksum
from tests.conftest import small_mlp

KEY = bytes(range(32))
PATTERN = 0x5EC12E75EC12E7  # a token id nothing else would write


def all_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())


def token_store(path: Path, key: bytes | None, **kw: object) -> ReplayStore:
    return ReplayStore(path, StoreConfig(**kw), seed=0, key=key)  # type: ignore[arg-type]


def test_records_are_unreadable_without_the_key(tmp_path: Path) -> None:
    store = token_store(tmp_path / "r.db", KEY, capacity_records=16)
    x = torch.full((4, 6), PATTERN, dtype=torch.long)
    store.append(x, torch.arange(4), torch.randn(4, 3), stream="alice-private-notes")
    raw = all_bytes(tmp_path / "r.db")  # the database and its write-ahead log, as they are on disk
    assert struct.pack("<q", PATTERN) not in raw and b"alice-private-notes" not in raw
    store.close()
    with pytest.raises(StoreKeyError, match="encrypted"):
        token_store(tmp_path / "r.db", None)
    with pytest.raises(StoreKeyError, match="does not open with this key"):
        token_store(tmp_path / "r.db", bytes(32))
    again = token_store(tmp_path / "r.db", KEY)
    batch = again.read(again.slots())
    assert torch.equal(batch.x, x) and batch.logits is not None
    report = again.privacy_report()
    assert report.per_stream["alice-private-notes"][0] == 4
    again.close()


def test_a_bad_key_is_refused_before_the_file_is_created(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="7 bytes"):
        token_store(tmp_path / "r.db", b"short!!")
    assert not (tmp_path / "r.db").exists()


def test_a_plain_store_with_records_refuses_a_key(tmp_path: Path) -> None:
    store = token_store(tmp_path / "r.db", None, capacity_records=4)
    store.append(torch.ones(2, 3, dtype=torch.long), torch.arange(2))
    store.close()
    with pytest.raises(StoreKeyError, match="not encrypted"):
        token_store(tmp_path / "r.db", KEY)


def test_a_ciphertext_moved_to_another_record_does_not_open(tmp_path: Path) -> None:
    store = token_store(tmp_path / "r.db", KEY, capacity_records=4)
    store.append(torch.arange(12).reshape(2, 6), torch.tensor([0, 0]))
    store.close()
    db = sqlite3.connect(tmp_path / "r.db")
    rows = {r[0]: r for r in db.execute("SELECT slot, stream, label, codes, scale, zero_point, logits FROM records")}
    # swap the sealed codes of slots 0 and 1 and fix the checksums, as an attacker could
    for slot, other in ((0, 1), (1, 0)):
        _, stream, label, _, scale, zp, logits = rows[slot]
        codes = rows[other][3]
        db.execute("UPDATE records SET codes=?, checksum=? WHERE slot=?",
                   (codes, checksum(slot, stream, label, codes, scale, zp, logits, (None,) * 5), slot))
    db.commit()
    db.close()
    with pytest.warns(RuntimeWarning, match="2 damaged record"):
        store = token_store(tmp_path / "r.db", KEY, capacity_records=4)
    assert len(store) == 0
    store.close()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_store_files_are_the_owners_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = token_store(tmp_path / "r.db", KEY, capacity_records=4)
        store.append(torch.ones(2, 3, dtype=torch.long), torch.arange(2))
        files = [p for p in tmp_path.iterdir() if p.name.startswith("r.db")]
        assert {p.name for p in files} >= {"r.db", "r.db-wal", "r.db-lock"}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p.name
        store.close()
    finally:
        os.umask(old)


@pytest.mark.parametrize("key", [None, KEY])
def test_an_evicted_record_does_not_survive_a_checkpoint(tmp_path: Path, key: bytes | None) -> None:
    store = token_store(tmp_path / "r.db", key, capacity_records=1)
    secret = torch.full((1, 6), PATTERN, dtype=torch.long)
    store.append(secret, torch.zeros(1, dtype=torch.long))
    for i in range(500):  # until the reservoir replaces it
        store.append(torch.full((1, 6), i, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        if int(store.read(np.array([0])).x[0, 0]) != PATTERN:
            break
    assert int(store.read(np.array([0])).x[0, 0]) != PATTERN
    store.checkpoint()
    assert struct.pack("<q", PATTERN) not in all_bytes(tmp_path / "r.db")
    store.close()
    assert struct.pack("<q", PATTERN) not in all_bytes(tmp_path / "r.db")


def test_the_runtime_passes_the_key_and_never_saves_it(tmp_path: Path) -> None:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", wake=WakeConfig(train="all", replay_batch=0), store_key=KEY)
    es.learn(torch.rand(8, 8), torch.randint(0, 3, (8,)))
    ckpt = es.save(tmp_path / "ckpt")
    es.store.close()
    assert KEY not in b"".join(p.read_bytes() for p in ckpt.iterdir())
    assert KEY.hex().encode() not in b"".join(p.read_bytes() for p in ckpt.iterdir())
    with pytest.raises(StoreKeyError):
        EdgeSleep.load(ckpt, small_mlp())
    again = EdgeSleep.load(ckpt, small_mlp(), store_key=KEY)
    assert len(again.store) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert again.sleep(steps=5).completed
    again.store.close()


def test_an_encrypted_stores_records_are_found_by_stream_and_deleted(tmp_path: Path) -> None:
    store = token_store(tmp_path / "r.db", KEY, capacity_records=10)
    store.append(torch.rand(3, 4), torch.zeros(3, dtype=torch.long), stream="bob")
    store.append(torch.rand(2, 4), torch.ones(2, dtype=torch.long), stream="alice")
    assert store.stream_slots("bob").tolist() == [0, 1, 2]  # the tags are sealed on disk, opened here
    assert store.delete(store.stream_slots("bob")) == 3 and len(store) == 2
    assert store.privacy_report().per_stream.keys() == {"alice"}
    store.close()


def _forge(path: Path, slot: int, **changes: object) -> None:
    """Change clear fields of a record and recompute its CRC, as someone with the file could."""
    db = sqlite3.connect(path)
    cols = "slot, stream, label, codes, scale, zero_point, logits, dp_epsilon, dp_delta, dp_max_norm, dp_sigma, label_epsilon"
    row = dict(zip(cols.split(", "), db.execute(f"SELECT {cols} FROM records WHERE slot=?", (slot,)).fetchone()))
    row.update(changes)
    privacy = tuple(row[k] for k in ("dp_epsilon", "dp_delta", "dp_max_norm", "dp_sigma", "label_epsilon"))
    check = checksum(slot, row["stream"], row["label"], row["codes"], row["scale"], row["zero_point"], row["logits"],
                     privacy)
    sets = ", ".join(f"{k}=?" for k in changes)
    db.execute(f"UPDATE records SET {sets}, checksum=? WHERE slot=?", (*changes.values(), check, slot))
    db.commit()
    db.close()


@pytest.mark.parametrize("forgery", ["tripled scale", "dp_epsilon", "label", "copied from another store"])
def test_a_forged_clear_field_makes_the_record_fail_to_open(tmp_path: Path, forgery: str) -> None:
    """Issue 20, item 4: a CRC is not a MAC. The clear fields and a per-store id are AES-GCM's
    associated data, so a forged field (with its CRC recomputed) is quarantined, not believed."""
    store = token_store(tmp_path / "r.db", KEY, capacity_records=8)
    store.append(torch.arange(24).reshape(4, 6) * 1.0, torch.arange(4), torch.randn(4, 3), stream="alice")
    store.close()
    if forgery == "tripled scale":
        _forge(tmp_path / "r.db", 0, scale=3.0)
    elif forgery == "dp_epsilon":
        _forge(tmp_path / "r.db", 0, dp_epsilon=0.01)
    elif forgery == "label":
        _forge(tmp_path / "r.db", 0, label=3)
    else:  # another store under the same key: its record 0, moved into this file
        other = token_store(tmp_path / "o.db", KEY, capacity_records=8)
        other.append(torch.ones(4, 6), torch.arange(4), torch.randn(4, 3), stream="alice")
        other.close()
        db = sqlite3.connect(tmp_path / "o.db")
        cols = "stream, label, codes, scale, zero_point, logits, checksum"
        moved = db.execute(f"SELECT {cols} FROM records WHERE slot=0").fetchone()
        db.close()
        db = sqlite3.connect(tmp_path / "r.db")
        db.execute(f"UPDATE records SET ({cols}) = (?, ?, ?, ?, ?, ?, ?) WHERE slot=0", moved)
        db.commit()
        db.close()
    with pytest.warns(RuntimeWarning, match="1 damaged record"):
        store = token_store(tmp_path / "r.db", KEY, capacity_records=8)
    assert store.slots().tolist() == [1, 2, 3]
    store.close()


def test_an_encrypted_stores_clear_fields_say_nothing_about_a_record(tmp_path: Path) -> None:
    """Issue 20, item 3: the exact scale (the row's range), the creation time and the stream tag's
    length were in the clear; an embedding's scale matched members 200 of 200 times."""
    store = token_store(tmp_path / "r.db", KEY, capacity_records=8)
    x = torch.randn(4, 6) * torch.tensor([[1.0], [5.0], [0.1], [3.0]])
    store.append(x[:2], torch.arange(2), stream="bob")
    store.append(x[2:], torch.arange(2), stream="alice-private-notes")
    assert torch.allclose(store.read(store.slots()).x, x, atol=0.2)
    store.close()
    db = sqlite3.connect(tmp_path / "r.db")
    rows = db.execute("SELECT created_s, scale, zero_point, LENGTH(stream) FROM records").fetchall()
    db.close()
    assert {r[:3] for r in rows} == {(0.0, 1.0, 0)} and len({r[3] for r in rows}) == 1, rows
    again = token_store(tmp_path / "r.db", KEY)
    assert torch.allclose(again.read(again.slots()).x, x, atol=0.2)
    assert again.stream_slots("alice-private-notes").tolist() == [2, 3]
    again.close()


def test_a_store_sealed_in_the_first_format_is_resealed_on_open(tmp_path: Path) -> None:
    """A store encrypted before the store id and the clear fields were bound: its records are
    re-sealed once, in one transaction, and read back the same."""
    from edge_sleep.seal import Sealer
    from edge_sleep.store import database as sql
    from edge_sleep.store.codec import aad, decode_row, privacy_bytes, unpad_stream

    store = token_store(tmp_path / "r.db", KEY, capacity_records=8)
    x = torch.randn(3, 6) * 4
    store.append(x, torch.arange(3), torch.randn(3, 3), stream="carol")
    before = store.read(store.slots())
    store_id = store._store_id
    store.close()
    sealer, db = Sealer(KEY), sqlite3.connect(tmp_path / "r.db")
    for row in db.execute(sql.SELECT_RECORDS).fetchall():  # write each record back as the first format did
        why, codes, logits, scale, zp = decode_row(row, 8, 6, 3, sealer, store_id)
        assert why is None
        slot, label, privacy = row[0], row[2], tuple(row[8:13])
        tag = unpad_stream(sealer.open(row[1], sql_record_aad(store_id, slot, label, privacy)))
        stream = sealer.seal(tag.encode(), aad(slot, label, b"stream"))
        codes = sealer.seal(codes, aad(slot, label, b"codes"))
        logits = sealer.seal(logits, aad(slot, label, b"logits"))
        check = checksum(slot, stream, label, codes, scale, zp, logits, privacy_bytes(privacy))
        db.execute("UPDATE records SET stream=?, codes=?, scale=?, zero_point=?, logits=?, checksum=? WHERE slot=?",
                   (stream, codes, scale, zp, logits, check, slot))
    enc = {"cipher": "AES-GCM", "key_check": sql.key_check(sealer)["key_check"]}
    sql.set_meta(db, "encryption", enc)
    db.commit()
    db.close()
    (tmp_path / "r.db-witness").unlink()  # stores of that format had none
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = token_store(tmp_path / "r.db", KEY)
    after = again.read(again.slots())
    assert torch.equal(after.x, before.x) and torch.equal(after.logits, before.logits)
    assert again.stream_slots("carol").tolist() == [0, 1, 2] and again._store_id not in (None, store_id)
    again.close()
    db = sqlite3.connect(tmp_path / "r.db")
    assert {r for r in db.execute("SELECT scale, zero_point FROM records")} == {(1.0, 0)}
    db.close()


def sql_record_aad(store_id: bytes | None, slot: int, label: int, privacy: tuple[object, ...]) -> bytes:
    from edge_sleep.store.codec import privacy_bytes, record_aad

    assert store_id is not None
    return record_aad(store_id, slot, label, privacy_bytes(privacy), b"stream")  # type: ignore[arg-type]


def test_an_empty_store_encrypted_in_the_first_format_takes_records(tmp_path: Path) -> None:
    """Its encryption metadata has no store id and there is nothing to re-seal: the id is added."""
    from edge_sleep.seal import Sealer
    from edge_sleep.store import database as sql

    token_store(tmp_path / "r.db", KEY).close()
    db = sqlite3.connect(tmp_path / "r.db")
    sql.set_meta(db, "encryption", {"cipher": "AES-GCM", "key_check": sql.key_check(Sealer(KEY))["key_check"]})
    db.commit()
    db.close()
    (tmp_path / "r.db-witness").unlink()
    store = token_store(tmp_path / "r.db", KEY, capacity_records=4)
    assert store._store_id is not None
    store.append(torch.arange(12).reshape(2, 6), torch.tensor([0, 1]), stream="dana")
    assert store.stream_slots("dana").tolist() == [0, 1]
    store.close()
    again = token_store(tmp_path / "r.db", KEY)
    assert torch.equal(again.read(again.slots()).x, torch.arange(12).reshape(2, 6))
    again.close()
