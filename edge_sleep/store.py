"""The on-disk replay store: one SQLite database in WAL mode (design.md section 4).

Each record keeps a latent as int8 codes with a per-row scale and zero point (integer inputs
such as token ids are kept exactly), its label, optionally the fp16 logits the model gave when the
record was written, a stream/task tag and a CRC32 checksum. Capacity is a byte budget; once full,
new records replace old ones by reservoir sampling (uniform over everything ever offered) or
class-balanced eviction (the largest class gives up a record). Every append is one transaction,
so a crash leaves either the whole batch or none of it.

Example:
    >>> import tempfile, torch
    >>> from edge_sleep.config import StoreConfig
    >>> d = tempfile.mkdtemp()
    >>> store = ReplayStore(f"{d}/replay.db", StoreConfig(capacity_records=4), seed=0)
    >>> written = store.append(torch.rand(10, 3), torch.arange(10) % 2)
    >>> len(store), store.seen, store.sample(2).x.shape
    (4, 10, torch.Size([2, 3]))
    >>> store.close()
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import sqlite3
import struct
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from edge_sleep.config import StoreConfig
from edge_sleep.errors import (
    EdgeSleepError,
    FingerprintMismatchError,
    FormatVersionError,
    InputError,
    StoreError,
    StoreKeyError,
    StorePathError,
    check_format_version,
)
from edge_sleep.locking import WriterLock
from edge_sleep.privacy import PrivacyReport, RecordPrivacy, summarize_privacy
from edge_sleep.seal import KEY_CHECK, Sealer
from edge_sleep.quant import dequantize_rows, quantize_rows

_F = TypeVar("_F", bound=Callable[..., Any])
# the store each database file has open in this process (a second one takes over from the first)
_OPEN: dict[str, weakref.ref[ReplayStore]] = {}
_OPEN_LOCK = threading.RLock()


def _locked(method: _F) -> _F:
    """Run a method under the store's lock, refusing a closed store with a clear error."""
    @functools.wraps(method)
    def wrapper(self: ReplayStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._closed is not None:
                raise StoreError(f"the replay store {str(self.path)!r} is closed ({self._closed}). Fix: "
                                 "use the store (or EdgeSleep) that has it open now, or open it again.")
            try:
                return method(self, *args, **kwargs)
            except (sqlite3.Error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _storage_error(self.path, e) from e

    return wrapper  # type: ignore[return-value]


def _path_error(path: Path, e: BaseException) -> StorePathError:
    """The store's file or folder cannot be created or opened for writing."""
    return StorePathError(
        f"cannot open the replay store at {str(path)!r} ({e}); expected a writable file path. Fix: pass a "
        "path in a folder this process can write, e.g. the app's files directory.")


def _storage_error(path: Path, e: BaseException) -> StoreError:
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

__all__ = ["ReplayStore", "ReplayBatch", "STORE_FORMAT_VERSION"]

STORE_FORMAT_VERSION = 2  # 2: each record keeps the privacy parameters it was written with
_STATE_FORMAT_VERSION = 1
_PRIVACY_COLUMNS = ("dp_epsilon", "dp_delta", "dp_max_norm", "dp_sigma", "label_epsilon")
_COLUMNS = ("slot", "created_s", "stream", "label", "codes", "scale", "zero_point", "logits", "checksum",
            *_PRIVACY_COLUMNS)
# a replaced record is overwritten in place (no delete and re-insert of its row)
_UPSERT = (f"INSERT INTO records({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           f"ON CONFLICT(slot) DO UPDATE SET {', '.join(f'{c}=excluded.{c}' for c in _COLUMNS[1:])}")
_RECORD_OVERHEAD_BYTES = 32  # id, slot, label, scale, zero point, checksum, time
_FP16_MAX = 65504.0  # logits are stored as fp16, saturated to its finite range


@dataclass
class ReplayBatch:
    """Records drawn from the store, decoded.

    Attributes:
        x: latents ``(n, *latent_shape)`` (float32, or int64 for integer inputs).
        y: labels ``(n,)`` int64.
        logits: stored logits ``(n, C)`` float32, or ``None`` if the store keeps none.
        slots: the records' slots ``(n,)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor | None
    slots: np.ndarray

    def to(self, device: torch.device | str) -> ReplayBatch:
        """The same records with ``x``, ``y`` and ``logits`` on ``device`` (the model's)."""
        return ReplayBatch(self.x.to(device), self.y.to(device),
                           None if self.logits is None else self.logits.to(device), self.slots)


def _checksum_v1(codes: bytes, logits: bytes | None, label: int) -> int:
    """Format 1's checksum (codes, logits, label): read only to migrate old files."""
    c = zlib.crc32(codes)
    if logits is not None:
        c = zlib.crc32(logits, c)
    return zlib.crc32(label.to_bytes(8, "little", signed=True), c)


def _privacy_bytes(privacy: tuple[float | None, ...]) -> bytes:
    return struct.pack("<5d", *(float("nan") if v is None else float(v) for v in privacy))


def _checksum(slot: int, stream: str | bytes, label: int, codes: bytes, scale: float, zero_point: int,
              logits: bytes | None, privacy: tuple[float | None, ...] | bytes) -> int:
    """CRC32 over every field of a record (slot, stream, label, codes, scale, zero point, logits,
    privacy parameters), each length-prefixed so that no two records share an encoding."""
    head = struct.pack("<qqdq", slot, label, scale, zero_point)
    c = zlib.crc32(head)
    tag = stream.encode() if isinstance(stream, str) else b"\x00sealed" + stream
    for part in (tag, codes, b"\xff" if logits is None else logits):
        c = zlib.crc32(struct.pack("<q", len(part)) + part, c)
    return zlib.crc32(privacy if isinstance(privacy, bytes) else _privacy_bytes(privacy), c)


def _row_bytes(a: np.ndarray) -> list[bytes]:
    """Each row of a C-contiguous 2-D array as bytes, from one copy of the whole array."""
    raw, width = a.tobytes(), a.shape[1] * a.itemsize
    return [raw[k:k + width] for k in range(0, len(raw), width)]


def _aad(slot: int, label: int, field: bytes) -> bytes:
    """What a sealed field is bound to: its record's slot and label, and which field it is."""
    return struct.pack("<qq", slot, label) + field


def _decode_row(row: tuple[Any, ...], cap: int, code_bytes: int, num_logits: int | None,
                sealer: Sealer | None) -> tuple[str | None, bytes, bytes | None]:
    """``(problem, codes, logits)`` of a stored row: ``problem`` says why it cannot be trusted
    (types, ranges, checksum, a sealed field that does not open, blob lengths), else ``None``."""
    slot, stream, label, codes, scale, zp, logits, checksum = row[:8]
    privacy = tuple(row[8:13])
    if not isinstance(slot, int) or not 0 <= slot < cap:
        return f"slot {slot!r} outside 0..{cap - 1}", b"", None
    if not isinstance(label, int) or label < 0:
        return f"label {label!r} is not a class index", b"", None
    if not isinstance(stream, (bytes if sealer is not None else str)):
        return "stream has the wrong type", b"", None
    if not isinstance(codes, bytes) or (logits is not None and not isinstance(logits, bytes)):
        return "codes or logits are not blobs", b"", None
    if not isinstance(scale, float) or not np.isfinite(scale) or scale <= 0 or not isinstance(zp, int):
        return f"scale {scale!r} / zero point {zp!r} out of range", b"", None
    if any(v is not None and not isinstance(v, (int, float)) for v in privacy):
        return "privacy parameters are not numbers", b"", None
    if not isinstance(checksum, int) or _checksum(slot, stream, label, codes, scale, zp, logits, privacy) != checksum:
        return "checksum mismatch", b"", None
    if sealer is not None:
        try:
            codes = sealer.open(codes, _aad(slot, label, b"codes"))
            logits = None if logits is None else sealer.open(logits, _aad(slot, label, b"logits"))
            sealer.open(stream if isinstance(stream, bytes) else stream.encode(), _aad(slot, label, b"stream"))
        except StoreKeyError:
            return "a sealed field does not open", b"", None
    if len(codes) != code_bytes:
        return f"codes are {len(codes)} bytes, expected {code_bytes}", b"", None
    if num_logits is not None and logits is not None and len(logits) != 2 * num_logits:
        return f"logits are not {2 * num_logits} bytes", b"", None
    return None, codes, logits


class ReplayStore:
    """Replay records in SQLite, with a byte capacity and reservoir/class-balanced eviction.

    Args:
        path: the database file; its folder is created if missing.
        config: capacity, eviction, logits and latent layer.
        fingerprint: the model's fingerprint (:func:`edge_sleep.modelio.model_fingerprint`);
            a store written by another architecture is refused.
        seed: seed of the store's random generator (eviction and sampling).
        key: encrypt the records at rest (AES-GCM, :mod:`edge_sleep.seal`): 16, 24 or 32 bytes
            from the platform keystore. A store created with a key needs it every time.

    Raises:
        StorePathError: the path cannot be created or opened for writing.
        FormatVersionError: the file was written by a newer format version.
        FingerprintMismatchError: the file belongs to another model.
        StoreKeyError: an encrypted store opened without its key, or with another key.
    """

    def __init__(
        self,
        path: str | Path,
        config: StoreConfig | None = None,
        *,
        fingerprint: str | None = None,
        seed: int | None = None,
        key: bytes | None = None,
    ) -> None:
        self._sealer = None if key is None else Sealer(key)  # a bad key is refused before the file is touched
        self.path = Path(path)
        self.config = config or StoreConfig()
        self.rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._closed: str | None = None
        self._writer = WriterLock(self.path) if str(path) != ":memory:" else None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _path_error(self.path, e) from e
        self._take_over()
        wal = Path(str(self.path) + "-wal")
        if str(path) != ":memory:" and self.path.is_file() and self.path.stat().st_size == 0 \
                and not (wal.is_file() and wal.stat().st_size > 0):
            self._release()
            raise StoreError(
                f"replay store {str(self.path)!r} is an empty file (0 bytes): it was truncated, or a crash came "
                "before its first write; nothing in it can be read. Fix: delete the file to start a new store "
                "(or restore it from a backup).")
        try:
            if str(path) != ":memory:" and not self.path.exists():
                # owner-only: SQLite gives its -wal and -shm files the database file's permissions
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            # any thread may use the connection: every use holds self._lock
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            # damaged text decodes with replacement characters (then fails its checksum), never raises
            self._db.text_factory = lambda raw: raw.decode("utf-8", "replace")
            self._db.execute("PRAGMA page_size=16384")  # a new file only: ~1 KB records waste less per page
            self._db.execute("PRAGMA secure_delete=ON")  # deleted and replaced records are overwritten with zeros
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create_tables()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
            if hasattr(self, "_db"):
                self._db.close()
            self._release()
            if isinstance(e, sqlite3.OperationalError) and "malformed" not in str(e):
                raise _path_error(self.path, e) from e
            raise _storage_error(self.path, e) from e
        except OSError as e:
            self._release()
            raise _path_error(self.path, e) from e
        self._layout_cache: dict[str, Any] | None = None
        self._labels: dict[int, int] = {}  # slot -> label
        self._mirror: dict[str, np.ndarray] = {}
        self._free: list[int] | None = None  # a heap of the free slots below capacity
        try:
            self._check_meta(fingerprint)
            self._seen = int(self._meta("seen") or 0)
            self._load_mirror()
        except BaseException as e:
            self._db.close()
            self._release()
            if isinstance(e, (sqlite3.Error, json.JSONDecodeError, UnicodeDecodeError)):
                raise _storage_error(self.path, e) from e
            if isinstance(e, (TypeError, ValueError, KeyError)) and not isinstance(e, EdgeSleepError):
                raise StoreError(f"replay store {str(self.path)!r} has unreadable metadata ({type(e).__name__}: "
                                 f"{e}); the file is damaged. Fix: move it aside and start a new store.") from e
            raise

    def _take_over(self) -> None:
        """Become this file's one writer: close another store of this process that has it open
        (it then refuses use, saying why), then take the file lock, which another process holds
        only while it has the store open (:class:`StoreBusyError` otherwise)."""
        if self._writer is None:
            return
        key = str(self.path.resolve())
        with _OPEN_LOCK:
            ref = _OPEN.get(key)
            other = ref() if ref is not None else None
            if other is not None and other is not self:
                other._close(f"another ReplayStore in this process opened {str(self.path)!r}")
            self._writer.acquire()
            _OPEN[key] = weakref.ref(self)

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.release()
        with _OPEN_LOCK:
            key = str(self.path.resolve()) if self._writer is not None else None
            if key is not None and (ref := _OPEN.get(key)) is not None and ref() is self:
                del _OPEN[key]

    def _load_mirror(self) -> None:
        """Read every record into memory once, verifying it; quarantine the ones that fail.

        The database is the durable truth; the in-memory mirror (int8 codes, not floats) makes
        sampling a replay batch an array lookup instead of a query. One process owns a store.
        A record whose checksum, slot, blob lengths or values do not hold is moved to the
        ``quarantine`` table (kept for inspection, never replayed) with a ``RuntimeWarning``;
        the others stay usable.

        Raises:
            StoreError: the store's own metadata (layout, capacity) cannot be read.
        """
        layout, cap = self._meta("layout"), self._meta("capacity_records")
        self._labels, self._mirror, self._free = {}, {}, None
        if layout is None or cap is None:
            return
        try:
            width = int(np.prod(layout["latent_shape"]))
            kind = layout["latent_kind"]
            num_logits = layout["num_logits"]
            cap = int(cap)
            if kind not in ("int8q", "int64") or cap < 1 or width < 1:
                raise ValueError(f"latent_kind={kind!r}, capacity_records={cap}, width={width}")
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"replay store {str(self.path)!r} has unreadable metadata ({e}); its records "
                             "cannot be decoded. Fix: move the file aside and start a new store.") from None
        self._alloc_mirror(layout, cap)
        code_bytes = width * (1 if kind == "int8q" else 8)
        rows = self._db.execute(
            "SELECT slot, stream, label, codes, scale, zero_point, logits, checksum, "
            + ", ".join(_PRIVACY_COLUMNS) + " FROM records").fetchall()
        bad: list[tuple[Any, str]] = []
        for row in rows:
            why, codes, logits = _decode_row(row, cap, code_bytes, num_logits, self._sealer)
            if why is not None:
                bad.append((row[0], why))
                continue
            self._put(row[0], row[2], codes, row[4], row[5], logits)
        if bad:
            self._quarantine(bad)

    def _quarantine(self, bad: list[tuple[Any, str]]) -> None:
        """Move the records at ``bad``'s slots to the ``quarantine`` table, saying why."""
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("CREATE TABLE IF NOT EXISTS quarantine AS SELECT * FROM records WHERE 0")
            have = {row[1] for row in self._db.execute("PRAGMA table_info(quarantine)")}
            for col, decl in (("reason", "TEXT"), ("quarantined_s", "REAL")):
                if col not in have:
                    self._db.execute(f"ALTER TABLE quarantine ADD COLUMN {col} {decl}")
            for slot, why in bad:
                self._db.execute("INSERT INTO quarantine SELECT *, ?, ? FROM records WHERE slot IS ?",
                                 (why, now, slot))
                self._db.execute("DELETE FROM records WHERE slot IS ?", (slot,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        shown = ", ".join(f"slot {slot!r}: {why}" for slot, why in bad[:5])
        warnings.warn(
            f"replay store {str(self.path)!r}: {len(bad)} damaged record(s) moved to its quarantine table "
            f"({shown}{', ...' if len(bad) > 5 else ''}); the other {len(self._labels)} records are usable. "
            "The file was changed outside edge-sleep or damaged on disk.", RuntimeWarning, stacklevel=3)

    def _alloc_mirror(self, layout: dict[str, Any], cap: int) -> None:
        width = int(np.prod(layout["latent_shape"]))
        kind = np.int8 if layout["latent_kind"] == "int8q" else np.int64
        self._mirror = {"codes": np.zeros((cap, width), dtype=kind), "scale": np.ones(cap, np.float32),
                        "zero_point": np.zeros(cap, np.int32), "label": np.zeros(cap, np.int64)}
        if layout["num_logits"] is not None:
            self._mirror["logits"] = np.zeros((cap, layout["num_logits"]), np.float16)

    def _put(self, slot: int, label: int, codes: bytes, scale: float, zp: int, logits: bytes | None) -> None:
        m = self._mirror
        m["codes"][slot] = np.frombuffer(codes, dtype=m["codes"].dtype)
        m["scale"][slot], m["zero_point"][slot], m["label"][slot] = scale, zp, label
        if logits is not None and "logits" in m:
            m["logits"][slot] = np.frombuffer(logits, dtype=np.float16)
        self._labels[slot] = label

    # ------------------------------------------------------------------ setup
    def _create_tables(self) -> None:
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
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
        )

    def _write_key_check(self, sealer: Sealer) -> None:
        """Record that the store is encrypted, with a sealed constant that only its key opens."""
        self._set_meta("encryption", {"cipher": "AES-GCM", "key_check": sealer.seal(KEY_CHECK, b"meta").hex()})

    def _check_key(self) -> None:
        """The key opens the store's key check; an unencrypted store with records refuses a key."""
        enc = self._meta("encryption")
        if enc is None:
            if self._sealer is None:
                return
            if self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]:
                raise StoreKeyError(f"replay store {str(self.path)!r} is not encrypted and holds records; a key "
                                    "was given. Fix: open it without a key, or start a new store with the key.")
            self._write_key_check(self._sealer)
            return
        if self._sealer is None:
            raise StoreKeyError(f"replay store {str(self.path)!r} is encrypted ({enc.get('cipher')}); no key was "
                                "given. Fix: pass the key it was created with (key=..., from the platform keystore).")
        try:
            ok = self._sealer.open(bytes.fromhex(enc["key_check"]), b"meta") == KEY_CHECK
        except (StoreKeyError, KeyError, ValueError, TypeError):
            ok = False
        if not ok:
            raise StoreKeyError(f"replay store {str(self.path)!r} does not open with this key. Fix: pass the key "
                                "it was created with; without it its records cannot be read.")

    def _migrate(self, version: int) -> None:
        """Bring a version-1 file to this version: add the privacy columns (NULL: none applied)."""
        if version >= STORE_FORMAT_VERSION:
            return
        have = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for col in _PRIVACY_COLUMNS:
                if col not in have:
                    self._db.execute(f"ALTER TABLE records ADD COLUMN {col} REAL")
            # format 1's checksum left out slot, stream, scale and zero point: a record that
            # passes it gets one over every field; one that fails keeps it, and is quarantined
            rows = self._db.execute("SELECT slot, stream, label, codes, scale, zero_point, logits, checksum "
                                    "FROM records").fetchall()
            for slot, stream, label, codes, scale, zp, logits, checksum in rows:
                if isinstance(codes, bytes) and isinstance(label, int) and \
                        _checksum_v1(codes, logits, label) == checksum:
                    new = _checksum(slot, stream, label, codes, float(scale), int(zp), logits, (None,) * 5)
                    self._db.execute("UPDATE records SET checksum=? WHERE slot=?", (new, slot))
            self._set_meta("format_version", STORE_FORMAT_VERSION)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, json.dumps(value)),
        )

    def _check_meta(self, fingerprint: str | None) -> None:
        version = self._meta("format_version")
        if version is None:
            self._db.execute("BEGIN")
            self._set_meta("format_version", STORE_FORMAT_VERSION)
            self._set_meta("config", asdict(self.config))
            self._set_meta("seen", 0)
            if fingerprint is not None:
                self._set_meta("fingerprint", fingerprint)
            if self._sealer is not None:
                self._write_key_check(self._sealer)
            self._db.execute("COMMIT")
            return
        try:
            check_format_version(f"replay store {str(self.path)!r}", version, STORE_FORMAT_VERSION)
            self._migrate(int(version))
            self._check_key()
            self.bind(fingerprint)
        except (FormatVersionError, FingerprintMismatchError, StoreKeyError):
            self._db.close()
            raise

    @_locked
    def bind(self, fingerprint: str | None) -> None:
        """Tie the store to a model fingerprint; refuse one written by another model.

        Raises:
            FingerprintMismatchError: the store already belongs to another fingerprint.
        """
        if fingerprint is None:
            return
        stored = self._meta("fingerprint")
        if stored is not None and stored != fingerprint:
            raise FingerprintMismatchError(
                f"replay store {str(self.path)!r} was written by a model with fingerprint "
                f"{stored!r}; this model's is {fingerprint!r}. Fix: use a new store path for this "
                "model, or load the model the store belongs to."
            )
        if stored is None:
            self._set_meta("fingerprint", fingerprint)

    # ------------------------------------------------------------ properties
    @_locked
    def __len__(self) -> int:
        return len(self._labels)

    @property
    def seen(self) -> int:
        """How many records were ever offered to the store (the reservoir's stream length)."""
        return self._seen

    @property
    def capacity_records(self) -> int | None:
        """Records that fit the byte budget (known after the first append)."""
        if self._mirror:
            return int(self._mirror["label"].shape[0])
        return self._meta("capacity_records")

    @_locked
    def privacy_report(self) -> PrivacyReport:
        """What protects the records held now, in numbers and words (``str(report)``).

        Groups the records by the parameters each was written with and by stream; a stream's
        records together are accounted with Opacus' RDP accountant.
        """
        groups: dict[tuple[RecordPrivacy, str], int] = {}
        for row in self._db.execute("SELECT " + ", ".join(_PRIVACY_COLUMNS) + ", stream, slot, label FROM records"):
            stream = row[5]
            if self._sealer is not None and isinstance(stream, bytes):
                stream = self._sealer.open(stream, _aad(row[6], row[7], b"stream")).decode()
            key = (RecordPrivacy(*row[:5]), str(stream))
            groups[key] = groups.get(key, 0) + 1
        return summarize_privacy((p, stream, n) for (p, stream), n in groups.items())

    @_locked
    def slots(self) -> np.ndarray:
        """The slots that hold a record now, sorted ``(len(self),)`` int64 (for :meth:`read`)."""
        return np.sort(np.fromiter(self._labels.keys(), dtype=np.int64, count=len(self._labels)))

    @_locked
    def bytes_used(self) -> int:
        """Bytes of record payload held (codes, logits and fixed overhead per record)."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(codes) + COALESCE(LENGTH(logits), 0)), 0), COUNT(*) FROM records"
        ).fetchone()
        return int(row[0]) + _RECORD_OVERHEAD_BYTES * int(row[1])

    @_locked
    def class_counts(self) -> dict[int, int]:
        """``{label: records}`` currently held."""
        counts: dict[int, int] = {}
        for lab in self._labels.values():
            counts[lab] = counts.get(lab, 0) + 1
        return counts

    # ---------------------------------------------------------------- writes
    def _layout(self, latents: torch.Tensor, logits: torch.Tensor | None) -> dict[str, Any]:
        layout = {
            "latent_shape": list(latents.shape[1:]),
            "latent_kind": "int64" if not latents.is_floating_point() else "int8q",
            "num_logits": None if logits is None else int(logits.shape[1]),
        }
        known = self._meta_layout()
        if known is None:
            return layout
        if known != layout:
            raise InputError(
                f"records of layout {layout} do not match the store's layout {known} "
                f"({str(self.path)!r}). Fix: pass latents of shape {tuple(known['latent_shape'])} "
                "or use a new store path."
            )
        return known

    @_locked
    def append(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        stream: str = "",
        privacy: RecordPrivacy | None = None,
    ) -> int:
        """Offer a batch to the store; each record is kept or dropped by the eviction policy.

        Args:
            latents: ``(N, ...)`` float (quantized to int8) or integer (kept exactly).
            labels: ``(N,)`` integer labels.
            logits: ``(N, C)`` logits to keep (fp16, saturated at +-65504), or ``None``.
            stream: a tag (task or stream name) kept with each record.
            privacy: the mechanism already applied to this batch
                (:func:`edge_sleep.privacy.privatize`), kept with each record for
                :meth:`privacy_report`; ``None``: none.

        Returns:
            How many of the ``N`` records were written (a record may be written and then
            replaced by a later one of the same batch).

        Raises:
            InputError: shapes disagree, values are not finite, or the layout differs from the
                store's. Nothing is written then.
        """
        n = latents.shape[0]
        if labels.shape != (n,) or (logits is not None and (logits.ndim != 2 or logits.shape[0] != n)):
            raise InputError(
                f"append got latents {tuple(latents.shape)}, labels {tuple(labels.shape)}, logits "
                f"{None if logits is None else tuple(logits.shape)}; expected (N, ...), (N,), (N, C). "
                "Fix: pass one label (and one logits row) per latent."
            )
        if latents.is_floating_point() and not torch.isfinite(latents).all():
            raise InputError("append got non-finite latents (NaN or inf); expected finite values. "
                             "Fix: drop or clean those rows before storing them.")
        if logits is not None and not torch.isfinite(logits).all():
            raise InputError("append got non-finite logits (NaN or inf); expected finite values. "
                             "Fix: drop those rows, or pass logits=None.")
        if self.config.store_logits is False:
            logits = None
        layout = self._layout(latents, logits)
        if n == 0:
            return 0
        labels_l = [int(v) for v in labels.tolist()]
        flat = latents.detach().reshape(n, -1).cpu()
        cap = self.capacity_records or self._capacity_for(flat, logits)
        seen = self._seen
        before = dict(self._labels)
        free_before = None if self._free is None else list(self._free)
        chosen: list[tuple[int, int]] = []  # (row, slot)
        for i in range(n):
            seen += 1
            slot = self._choose_slot(labels_l[i], seen, cap)
            if slot is not None:
                chosen.append((i, slot))
                self._labels[slot] = labels_l[i]
        if not chosen:  # nothing kept: no encoding, but the count of offered records is durable
            try:
                self._set_meta("seen", seen)  # one autocommitted statement
            except BaseException:
                self._labels, self._free = before, free_before
                raise
            self._seen = seen
            return 0
        rows = torch.tensor([i for i, _ in chosen], dtype=torch.int64)
        if layout["latent_kind"] == "int8q":
            codes_t, scale_t, zp_t = quantize_rows(flat[rows])
            codes_np = np.ascontiguousarray(codes_t.numpy())
            scales, zps = scale_t.tolist(), zp_t.tolist()
        else:
            codes_np = np.ascontiguousarray(flat[rows].numpy().astype(np.int64))
            scales, zps = [1.0] * len(chosen), [0] * len(chosen)
        codes = _row_bytes(codes_np)
        logits_np = None if logits is None else np.ascontiguousarray(
            # saturated to fp16's range: a stored logit is never inf
            logits.detach()[rows].cpu().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).numpy())
        logit_bytes: list[bytes | None] = [None] * len(chosen) if logits_np is None else list(_row_bytes(logits_np))
        now = time.time()
        stored_codes, stored_logits = codes, logit_bytes
        streams: list[str | bytes] = [stream] * len(chosen)
        if self._sealer is not None:
            seal = self._sealer.seal
            stored_codes = [seal(codes[j], _aad(slot, labels_l[i], b"codes")) for j, (i, slot) in enumerate(chosen)]
            stored_logits = [None if (lb := logit_bytes[j]) is None else seal(lb, _aad(slot, labels_l[i], b"logits"))
                             for j, (i, slot) in enumerate(chosen)]
            streams = [seal(stream.encode(), _aad(slot, labels_l[i], b"stream")) for i, slot in chosen]
        dp = privacy or RecordPrivacy()
        dp_row = (dp.epsilon, dp.delta, dp.max_norm, dp.sigma, dp.label_epsilon)
        dp_bytes = _privacy_bytes(dp_row)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if not self._mirror:  # the first records fix the layout and the capacity
                self._set_meta("layout", layout)
                self._set_meta("capacity_records", cap)
            self._db.executemany(
                _UPSERT,
                [
                    (slot, now, streams[j], labels_l[i], stored_codes[j], scales[j], zps[j], stored_logits[j],
                     _checksum(slot, streams[j], labels_l[i], stored_codes[j], scales[j], zps[j], stored_logits[j],
                               dp_bytes),
                     *dp_row)
                    for j, (i, slot) in enumerate(chosen)
                ],
            )
            self._set_meta("seen", seen)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._labels, self._free = before, free_before
            raise
        self._seen = seen
        self._layout_cache = layout
        if not self._mirror:
            self._alloc_mirror(layout, cap)
        # the mirror in one go per array (a slot written twice in this batch keeps its last record)
        slots = np.array([slot for _, slot in chosen], dtype=np.int64)
        m = self._mirror
        m["codes"][slots] = codes_np
        m["scale"][slots], m["zero_point"][slots] = scales, zps
        m["label"][slots] = [labels_l[i] for i, _ in chosen]
        if logits_np is not None and "logits" in m:
            m["logits"][slots] = logits_np
        return len(chosen)

    def _capacity_for(self, flat: torch.Tensor, logits: torch.Tensor | None) -> int:
        """Records that fit the byte budget, from the size of one record of this layout."""
        code_bytes = flat.shape[1] * (1 if flat.is_floating_point() else 8)
        per_record = code_bytes + (0 if logits is None else 2 * logits.shape[1]) + _RECORD_OVERHEAD_BYTES
        cap = int(self.config.capacity_mb * 1e6) // per_record
        if self.config.capacity_records is not None:
            cap = min(cap, self.config.capacity_records)
        if cap < 1:
            raise InputError(
                f"one record takes {per_record} bytes but capacity_mb={self.config.capacity_mb}; "
                "expected room for at least one record. Fix: raise capacity_mb."
            )
        return cap

    def _choose_slot(self, label: int, seen: int, cap: int) -> int | None:
        """The slot a new record goes to, or ``None`` to drop it."""
        if len(self._labels) < cap:  # the lowest free slot (holes appear where records were quarantined)
            if self._free is None:
                self._free = sorted(set(range(cap)) - set(self._labels))  # sorted: already a heap
            return heapq.heappop(self._free)
        if self.config.eviction == "reservoir":
            j = int(self.rng.integers(0, seen))
            return j if j < cap else None
        # class-balanced: a record of a largest class makes room, unless the new one is of it
        counts = self.class_counts()
        largest = max(counts.values())
        if counts.get(label, 0) == largest:
            # reservoir within its own class
            own = [s for s, lab in self._labels.items() if lab == label]
            j = int(self.rng.integers(0, seen))
            return own[j % len(own)] if j < cap else None
        big = [c for c, k in counts.items() if k == largest]
        victim_class = big[int(self.rng.integers(0, len(big)))]
        victims = [s for s, lab in self._labels.items() if lab == victim_class]
        return victims[int(self.rng.integers(0, len(victims)))]

    # ----------------------------------------------------------------- reads
    @_locked
    def sample(self, n: int, *, balanced: bool = False) -> ReplayBatch:
        """Draw ``min(n, len(self))`` records without replacement.

        Args:
            n: records wanted.
            balanced: draw classes uniformly first, then records within each class.

        Raises:
            StoreError: the store is empty.
        """
        if not self._labels:
            raise StoreError(f"replay store {str(self.path)!r} is empty; call learn() (or append) "
                             "before sampling from it.")
        slots_all = np.fromiter(self._labels.keys(), dtype=np.int64)
        k = min(n, slots_all.size)
        if balanced:
            labels_all = np.fromiter(self._labels.values(), dtype=np.int64)
            classes, inv, counts = np.unique(labels_all, return_inverse=True, return_counts=True)
            p = 1.0 / (len(classes) * counts[inv])
            slots = self.rng.choice(slots_all, size=k, replace=False, p=p / p.sum())
        else:
            slots = self.rng.choice(slots_all, size=k, replace=False)
        return self.read(slots)

    @_locked
    def read(self, slots: np.ndarray) -> ReplayBatch:
        """Decode the records at ``slots``, in that order."""
        layout, m = self._meta_layout(), self._mirror
        slots = np.asarray(slots, dtype=np.int64)
        shape = (len(slots), *layout["latent_shape"])
        codes = torch.from_numpy(m["codes"][slots])
        if layout["latent_kind"] == "int8q":
            x = dequantize_rows(codes, torch.from_numpy(m["scale"][slots]),
                                torch.from_numpy(m["zero_point"][slots])).reshape(shape)
        else:
            x = codes.reshape(shape)
        logits = torch.from_numpy(m["logits"][slots].astype(np.float32)) if "logits" in m else None
        return ReplayBatch(x=x, y=torch.from_numpy(m["label"][slots]), logits=logits, slots=slots)

    def _meta_layout(self) -> Any:
        if self._layout_cache is None:
            self._layout_cache = self._meta("layout")
        return self._layout_cache

    # ----------------------------------------------------------------- state
    @_locked
    def state_dict(self) -> dict[str, Any]:
        """The store's in-process state (its generator); the records live in the file."""
        return {"format_version": _STATE_FORMAT_VERSION, "rng": self.rng.bit_generator.state}

    @_locked
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            FormatVersionError: the state was written by a newer format version.
        """
        check_format_version("ReplayStore state", state.get("format_version"), _STATE_FORMAT_VERSION)
        self.rng.bit_generator.state = state["rng"]

    @_locked
    def checkpoint(self) -> None:
        """Move the write-ahead log into the database and truncate it to zero bytes.

        With ``secure_delete`` on, a replaced or evicted record is then gone from both files.
        :meth:`close` does this too.
        """
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def close(self) -> None:
        """Save the stream length, close the database and free the file for another writer.

        Records are already committed. Safe from any thread, and more than once.
        """
        self._close("closed by close()")

    def _close(self, reason: str) -> None:
        with self._lock:
            if self._closed is not None:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._set_meta("seen", self._seen)
                self._db.execute("COMMIT")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            finally:
                self._db.close()
                self._closed = reason
                self._release()

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
