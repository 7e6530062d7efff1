"""Fuzz the store's opener and record decoder: random bytes and random field values.

Whatever the file holds, opening and reading it either works or raises an ``EdgeSleepError``.
"""

from __future__ import annotations

import sqlite3
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sleep.config import StoreConfig
from edge_sleep.errors import EdgeSleepError
from edge_sleep.store import ReplayStore

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COLUMNS = ["slot", "stream", "label", "codes", "scale", "zero_point", "logits", "checksum", "created_s",
           "dp_epsilon", "dp_sigma"]
VALUES = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=20),
                   st.binary(max_size=64))


def fresh_store(folder: Path) -> Path:
    store = ReplayStore(folder / "r.db", StoreConfig(capacity_records=6), seed=0)
    store.append(torch.rand(4, 3), torch.arange(4) % 2, torch.randn(4, 2), stream="s")
    store.close()
    return folder / "r.db"


def open_and_use(path: Path) -> None:
    """Open, read every record, sample and append: only EdgeSleepError may escape."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # quarantine warnings are expected
            store = ReplayStore(path, StoreConfig(capacity_records=6), seed=0)
    except EdgeSleepError:
        return
    try:
        if len(store):
            batch = store.read(store.slots())
            assert torch.isfinite(batch.x).all()
            store.sample(2)
        store.append(torch.rand(1, 3), torch.zeros(1, dtype=torch.long), torch.randn(1, 2))
    except EdgeSleepError:
        pass
    finally:
        store.close()


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096))
def test_random_bytes_as_the_database(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.db"
        path.write_bytes(data)
        open_and_use(path)


@FUZZ
@given(offset=st.integers(0, 20_000), junk=st.binary(min_size=1, max_size=64))
def test_random_bytes_written_into_a_real_store(offset: int, junk: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = fresh_store(Path(d))
        raw = bytearray(path.read_bytes())
        at = offset % max(1, len(raw))
        raw[at:at + len(junk)] = junk
        path.write_bytes(bytes(raw))
        open_and_use(path)


@FUZZ
@given(column=st.sampled_from(COLUMNS), value=VALUES, slot=st.integers(0, 3))
def test_random_field_values_in_a_record(column: str, value: object, slot: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = fresh_store(Path(d))
        db = sqlite3.connect(path)
        try:
            db.execute(f"UPDATE records SET {column}=? WHERE slot=?", (value, slot))
            db.commit()
        except sqlite3.IntegrityError:  # a constraint SQLite itself enforces (NOT NULL, a duplicate slot)
            return
        finally:
            db.close()
        open_and_use(path)


@FUZZ
@given(key=st.sampled_from(["layout", "capacity_records", "seen", "format_version", "fingerprint", "config"]),
       value=st.one_of(st.text(max_size=30), st.just("null"), st.just("{}"), st.just("[1, 2]"),
                       st.just('{"latent_shape": [3], "latent_kind": "int64", "num_logits": 9}')))
def test_random_metadata(key: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = fresh_store(Path(d))
        db = sqlite3.connect(path)
        db.execute("UPDATE meta SET value=? WHERE key=?", (value, key))
        db.commit()
        db.close()
        open_and_use(path)


def test_fuzz_helpers_see_a_good_store_as_good(tmp_path: Path) -> None:
    path = fresh_store(tmp_path)
    store = ReplayStore(path, StoreConfig(capacity_records=6), seed=0)
    assert len(store) == 4 and np.array_equal(store.slots(), np.arange(4))
    store.close()
