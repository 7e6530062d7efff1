"""The store's SQLite file: connection, schema, metadata, migration, quarantine, errors.

Functions over one ``sqlite3.Connection`` in autocommit mode (``isolation_level=None``): every
write that must be atomic runs inside :func:`transaction`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_sleep.errors import StoreError, StoreKeyError, StorePathError
from edge_sleep.seal import KEY_CHECK, Sealer
from edge_sleep.store import budget
from edge_sleep.store.codec import checksum, checksum_v1

__all__ = ["STORE_FORMAT_VERSION", "connect", "migrate", "path_error", "quarantine", "read_meta",
           "set_meta", "storage_error", "transaction"]

# 2: each record keeps the privacy parameters it was written with; 3: each metadata row has a checksum
STORE_FORMAT_VERSION = 3
PRIVACY_COLUMNS = ("dp_epsilon", "dp_delta", "dp_max_norm", "dp_sigma", "label_epsilon")
COLUMNS = ("slot", "created_s", "stream", "label", "codes", "scale", "zero_point", "logits", "checksum",
           *PRIVACY_COLUMNS)
# a replaced record is overwritten in place (no delete and re-insert of its row)
UPSERT = (f"INSERT INTO records({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
          f"ON CONFLICT(slot) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in COLUMNS[1:])}")
# what decode_row reads, in its order
SELECT_RECORDS = ("SELECT slot, stream, label, codes, scale, zero_point, logits, checksum, "
                  + ", ".join(PRIVACY_COLUMNS) + " FROM records")
STORAGE_ERRORS = (sqlite3.Error, json.JSONDecodeError, UnicodeDecodeError)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum INTEGER);
CREATE TABLE IF NOT EXISTS records (
    slot INTEGER PRIMARY KEY,
    created_s REAL NOT NULL,
    stream TEXT NOT NULL,
    label INTEGER NOT NULL,
    codes BLOB NOT NULL,
    scale REAL NOT NULL,
    zero_point INTEGER NOT NULL,
    logits BLOB,
    checksum INTEGER NOT NULL,
    dp_epsilon REAL,
    dp_delta REAL,
    dp_max_norm REAL,
    dp_sigma REAL,
    label_epsilon REAL
);
"""


def path_error(path: Path, e: BaseException) -> StorePathError:
    """The store's file or folder cannot be created or opened for writing."""
    return StorePathError(
        f"cannot open the replay store at {str(path)!r} ({e}); expected a writable file path. Fix: pass a "
        "path in a folder this process can write, e.g. the app's files directory.")


def storage_error(path: Path, e: BaseException) -> StoreError:
    """A storage failure as a :class:`StoreError` that names the file and the likely fix."""
    text = str(e)
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)) or "malformed" in text or "not a database" in text:
        fix = ("the file is damaged. Fix: restore it from a backup, or move it aside and start a new store "
               "(its records cannot be read)")
    elif "locked" in text or "busy" in text:
        fix = "another connection holds the database. Fix: close the other process's store and retry"
    elif "full" in text or "disk I/O" in text or "readonly" in text:
        fix = "the disk refused the write. Fix: free space or check the folder's permissions, then retry"
    else:
        fix = "Fix: check the file and the folder, then retry"
    return StoreError(f"replay store {str(path)!r}: {type(e).__name__}: {text}; {fix}.")


def check_not_empty(path: Path) -> None:
    """Refuse a zero-length database file with no WAL to recover from (never a silent empty store)."""
    wal = Path(str(path) + "-wal")
    if path.is_file() and path.stat().st_size == 0 and not (wal.is_file() and wal.stat().st_size > 0):
        raise StoreError(
            f"replay store {str(path)!r} is an empty file (0 bytes): it was truncated, or a crash came "
            "before its first write; nothing in it can be read. Fix: delete the file to start a new store "
            "(or restore it from a backup).")


def connect(path: Path, capacity_mb: float = 16.0) -> sqlite3.Connection:
    """Open (creating, owner-only) the database at ``path`` in WAL mode with the store's schema.

    A new file gets the page size of its budget (:func:`edge_sleep.store.budget.page_size_for`);
    the write-ahead log is checkpointed every :func:`~edge_sleep.store.budget.checkpoint_pages`
    pages and truncated back to that size, so the files stay within ``capacity_mb`` while the store
    is open and each transaction rewrites at most :func:`~edge_sleep.store.budget.append_pages`.

    Raises:
        StorePathError: the file or its folder cannot be created or opened.
        StoreError: the file is not a database or is damaged.
    """
    db = None
    try:
        if str(path) != ":memory:" and not path.exists():
            # owner-only: SQLite gives its -wal and -shm files the database file's permissions
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        # any thread may use the connection: the store serializes every use with its lock
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # damaged text decodes with replacement characters (then fails its checksum), never raises
        db.text_factory = lambda raw: raw.decode("utf-8", "replace")
        db.execute(f"PRAGMA page_size={budget.page_size_for(capacity_mb)}")  # a new file only
        db.execute("PRAGMA secure_delete=ON")  # deleted and replaced records are overwritten with zeros
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        frames = budget.checkpoint_pages(capacity_mb, page)
        db.execute(f"PRAGMA wal_autocheckpoint={frames}")
        db.execute(f"PRAGMA journal_size_limit={frames * (page + 24) + 32}")  # the frames and the log's header
        db.executescript(_SCHEMA)
        return db
    except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
        if db is not None:
            db.close()
        if isinstance(e, sqlite3.OperationalError) and "malformed" not in str(e):
            raise path_error(path, e) from e
        raise storage_error(path, e) from e
    except OSError as e:
        raise path_error(path, e) from e


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; anything raised inside rolls the whole of it back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def meta_checksum(key: str, text: str) -> int:
    """CRC32 of a metadata row: its key and its JSON text, so a flip in either is caught."""
    return zlib.crc32(key.encode("utf-8", "replace") + b"\0" + text.encode("utf-8", "replace"))


def set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
    text = json.dumps(value)
    db.execute("INSERT INTO meta(key, value, checksum) VALUES(?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
               "value=excluded.value, checksum=excluded.checksum", (key, text, meta_checksum(key, text)))


def read_meta(db: sqlite3.Connection) -> tuple[dict[str, Any], int]:
    """``(metadata, damaged)``: every metadata row whose checksum holds, and how many did not.

    The rows are read by scanning the table, not through its key index, so a flipped bit in the
    index cannot hide a key; an index that disagrees with the table is rebuilt first. Damaged rows
    (checksum, JSON, a key seen twice) are deleted: the caller restores their values from the
    witness (:mod:`edge_sleep.store.witness`) or refuses the store.
    """
    if "checksum" not in {row[1] for row in db.execute("PRAGMA table_info(meta)")}:  # format 1 and 2
        with transaction(db):
            db.execute("ALTER TABLE meta ADD COLUMN checksum INTEGER")
            for key, text in db.execute("SELECT key, value FROM meta").fetchall():
                if isinstance(key, str) and isinstance(text, str):
                    db.execute("UPDATE meta SET checksum=? WHERE key=?", (meta_checksum(key, text), key))
    if [row[0] for row in db.execute("PRAGMA integrity_check(meta)")] != ["ok"]:
        db.execute("REINDEX meta")
    meta: dict[str, Any] = {}
    bad: list[int] = []
    for rowid, key, text, check in db.execute("SELECT rowid, key, value, checksum FROM meta NOT INDEXED").fetchall():
        try:
            if not isinstance(key, str) or not isinstance(text, str) or key in meta \
                    or meta_checksum(key, text) != check:
                raise ValueError(key)
            meta[key] = json.loads(text)
        except ValueError:  # json.JSONDecodeError is one
            bad.append(rowid)
    if bad:
        with transaction(db):
            db.executemany("DELETE FROM meta WHERE rowid=?", [(r,) for r in bad])
    return meta, len(bad)


def key_check(sealer: Sealer) -> dict[str, str]:
    """The metadata that records a store as encrypted: a sealed constant only its key opens, and
    a new random id of the store that every sealed field is bound to
    (:func:`edge_sleep.store.codec.record_aad`)."""
    return {"cipher": "AES-GCM", "key_check": sealer.seal(KEY_CHECK, b"meta").hex(), "store_id": os.urandom(16).hex()}


def check_key(db: sqlite3.Connection, enc: Any, sealer: Sealer | None, path: Path) -> dict[str, str] | None:
    """The key opens the store's key check (``enc``, its ``encryption`` metadata); an unencrypted
    store with records refuses a key. Returns the key check to record when an empty store is
    given a key and has no store id (unencrypted, or encrypted in the first format: nothing to
    re-seal), else ``None``.

    Raises:
        StoreKeyError: a missing key, a wrong key, or a key for an unencrypted store with records.
    """
    if enc is None:
        if sealer is None:
            return None
        if db.execute("SELECT COUNT(*) FROM records").fetchone()[0]:
            raise StoreKeyError(f"replay store {str(path)!r} is not encrypted and holds records; a key "
                                "was given. Fix: open it without a key, or start a new store with the key.")
        return key_check(sealer)
    if sealer is None:
        cipher = enc.get("cipher") if isinstance(enc, dict) else None
        raise StoreKeyError(f"replay store {str(path)!r} is encrypted ({cipher}); no key was "
                            "given. Fix: pass the key it was created with (key=..., from the platform keystore).")
    try:
        ok = sealer.open(bytes.fromhex(enc["key_check"]), b"meta") == KEY_CHECK
    except (StoreKeyError, KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise StoreKeyError(f"replay store {str(path)!r} does not open with this key. Fix: pass the key "
                            "it was created with; without it its records cannot be read.")
    if "store_id" not in enc and not db.execute("SELECT COUNT(*) FROM records").fetchone()[0]:
        return key_check(sealer)
    return None


def migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring a version-1 or 2 file to this version: add the privacy columns (NULL: none applied)
    and the metadata checksums (added by :func:`read_meta`, which runs first)."""
    if version >= STORE_FORMAT_VERSION:
        return
    if version >= 2:
        set_meta(db, "format_version", STORE_FORMAT_VERSION)
        return
    have = {row[1] for row in db.execute("PRAGMA table_info(records)")}
    with transaction(db):
        for col in PRIVACY_COLUMNS:
            if col not in have:
                db.execute(f"ALTER TABLE records ADD COLUMN {col} REAL")
        # format 1's checksum left out slot, stream, scale and zero point: a record that
        # passes it gets one over every field; one that fails keeps it, and is quarantined
        rows = db.execute("SELECT slot, stream, label, codes, scale, zero_point, logits, checksum "
                          "FROM records").fetchall()
        for slot, stream, label, codes, scale, zp, logits, check in rows:
            if isinstance(codes, bytes) and isinstance(label, int) and checksum_v1(codes, logits, label) == check:
                new = checksum(slot, stream, label, codes, float(scale), int(zp), logits, (None,) * 5)
                db.execute("UPDATE records SET checksum=? WHERE slot=?", (new, slot))
        set_meta(db, "format_version", STORE_FORMAT_VERSION)


def quarantine(db: sqlite3.Connection, bad: list[tuple[Any, str]]) -> None:
    """Move the records at ``bad``'s slots to the ``quarantine`` table with the reason, in one
    transaction (kept for inspection, never replayed)."""
    now = time.time()
    with transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS quarantine AS SELECT * FROM records WHERE 0")
        have = {row[1] for row in db.execute("PRAGMA table_info(quarantine)")}
        for col, decl in (("reason", "TEXT"), ("quarantined_s", "REAL")):
            if col not in have:
                db.execute(f"ALTER TABLE quarantine ADD COLUMN {col} {decl}")
        for slot, why in bad:
            db.execute("INSERT INTO quarantine SELECT *, ?, ? FROM records WHERE slot IS ?", (why, now, slot))
            db.execute("DELETE FROM records WHERE slot IS ?", (slot,))
