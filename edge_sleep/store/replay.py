"""``ReplayStore``: the records in SQLite, one writer, and an in-memory mirror for sampling.

It ties the package's parts together: :mod:`~edge_sleep.store.codec` (a record's bytes),
:mod:`~edge_sleep.store.database` (the file) and :mod:`~edge_sleep.store.policy` (eviction and
sampling). Every public method holds the store's lock, so any thread may call it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict
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
    check_format_version,
)
from edge_sleep.locking import WriterLock
from edge_sleep.privacy import PrivacyReport, RecordPrivacy, delta_problem, summarize_privacy
from edge_sleep.quant import row_bounds
from edge_sleep.seal import Sealer
from edge_sleep.store import budget
from edge_sleep.store import database as sql
from edge_sleep.store.codec import (
    SEALED_SCALE,
    SEALED_ZERO_POINT,
    EncodedRows,
    ReplayBatch,
    aad,
    checksum,
    decode_row,
    decode_rows,
    encode_rows,
    privacy_bytes,
    pad_stream,
    record_aad,
    seal_rows,
    unpad_stream,
)
from edge_sleep.store.policy import Slots
from edge_sleep.store.witness import COUNTER_KEYS, IMMUTABLE_KEYS, Witness, reconcile

__all__ = ["ReplayStore"]

_F = TypeVar("_F", bound=Callable[..., Any])
_STATE_FORMAT_VERSION = 1
# the store each database file has open in this process (a second one takes over from the first)
_OPEN: dict[str, weakref.ref[ReplayStore]] = {}
_OPEN_LOCK = threading.RLock()
# a row whose largest value exceeds this many times the records' median largest value is far out
_RANGE_FACTOR = 50.0
_RANGE_MIN_RECORDS = 16
_STREAM_BYTES = 64  # stream tag bytes the byte budget counts per record, at least


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
            except sql.STORAGE_ERRORS as e:
                raise sql.storage_error(self.path, e) from e

    return wrapper  # type: ignore[return-value]


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
        in_memory = str(path) == ":memory:"
        self._writer = WriterLock(self.path) if not in_memory else None
        self._witness = Witness(self.path.resolve()) if not in_memory else None
        self._meta: dict[str, Any] = {}
        self._slots = Slots()
        self._mirror: dict[str, np.ndarray] = {}
        self._typical_absmax: tuple[int, float] | None = None  # (records it was taken over, value)
        self._range_warned = False
        self._size_warned = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise sql.path_error(self.path, e) from e
        # one open at a time per process: a second store of the same file (another thread's) waits,
        # then takes over from a first one that is whole, never from one half-open
        with _OPEN_LOCK:
            existed = not in_memory and self.path.exists()
            try:
                self._take_over()
            except OSError as e:  # the lock files cannot be created (StoreBusyError is no OSError)
                self._release()
                raise sql.path_error(self.path, e) from e
            try:
                if existed:
                    sql.check_not_empty(self.path)
                self._db = sql.connect(self.path, self.config.capacity_mb)
                self._page = int(self._db.execute("PRAGMA page_size").fetchone()[0])  # fixed for the file
            except BaseException:
                self._release()
                raise
            try:
                self._open_meta(fingerprint, existed)
                self._load_mirror()
            except BaseException as e:
                self._db.close()
                self._release()
                if isinstance(e, sql.STORAGE_ERRORS):
                    raise sql.storage_error(self.path, e) from e
                if isinstance(e, (TypeError, ValueError, KeyError)) and not isinstance(e, EdgeSleepError):
                    raise StoreError(f"replay store {str(self.path)!r} has unreadable metadata ({type(e).__name__}: "
                                     f"{e}); the file is damaged. Fix: move it aside and start a new store.") from e
                raise

    # ------------------------------------------------------------- ownership
    def _take_over(self) -> None:
        """Become this file's one writer: close another store of this process that has it open
        (it then refuses use, saying why), then take the file lock, which another process holds
        only while it has the store open (:class:`StoreBusyError` otherwise)."""
        if self._writer is None:
            return
        with _OPEN_LOCK:
            for key in self._writer.keys():  # the resolved path, and the file's device and inode
                ref = _OPEN.get(key)
                other = ref() if ref is not None else None
                if other is not None and other is not self:
                    other._close(f"another ReplayStore in this process opened {str(self.path)!r}")
            self._writer.acquire()
            for key in self._writer.keys():
                _OPEN[key] = weakref.ref(self)

    def _release(self) -> None:
        with _OPEN_LOCK:
            if self._writer is not None:
                for key in self._writer.keys():
                    if (ref := _OPEN.get(key)) is not None and ref() is self:
                        del _OPEN[key]
                self._writer.release()
            if self._witness is not None:
                with contextlib.suppress(OSError):
                    self._witness.close()

    # ----------------------------------------------------------------- setup
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
        layout, cap = self._meta.get("layout"), self._meta.get("capacity_records")
        self._slots, self._mirror = Slots(), {}
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
        if self._sealer is not None and self._store_id is None:
            self._reseal_first_format(cap, code_bytes, num_logits)
        bad: list[tuple[Any, str]] = []
        for row in self._db.execute(sql.SELECT_RECORDS).fetchall():
            why, codes, logits, scale, zp = decode_row(row, cap, code_bytes, num_logits, self._sealer, self._store_id)
            if why is not None:
                bad.append((row[0], why))
                continue
            self._put(row[0], row[2], codes, scale, zp, logits)
        if bad:
            sql.quarantine(self._db, bad)
            with self._write():  # the witness learns the new record count
                pass
            shown = ", ".join(f"slot {slot!r}: {why}" for slot, why in bad[:5])
            warnings.warn(
                f"replay store {str(self.path)!r}: {len(bad)} damaged record(s) moved to its quarantine table "
                f"({shown}{', ...' if len(bad) > 5 else ''}); the other {len(self._slots)} records are usable. "
                "The file was changed outside edge-sleep or damaged on disk.", RuntimeWarning, stacklevel=3)

    @property
    def _store_id(self) -> bytes | None:
        """The random id an encrypted store's sealed fields are bound to (``None``: not encrypted,
        or sealed in the first format, which bound them to slot and label only)."""
        enc = self._meta.get("encryption")
        store_id = enc.get("store_id") if isinstance(enc, dict) else None
        return bytes.fromhex(store_id) if isinstance(store_id, str) else None

    def _reseal_first_format(self, cap: int, code_bytes: int, num_logits: int | None) -> None:
        """Re-seal the records of an encrypted store written before its sealed fields were bound
        to the store's id and every clear field: one transaction, a new store id, the scale and
        zero point sealed with the codes, padded stream tags, no creation times. A record that
        does not open as written is left as it is (and quarantined by the load that follows)."""
        assert self._sealer is not None
        enc = sql.key_check(self._sealer)
        store_id = bytes.fromhex(enc["store_id"])
        rewritten = []
        for row in self._db.execute(sql.SELECT_RECORDS).fetchall():
            why, codes, logits, scale, zp = decode_row(row, cap, code_bytes, num_logits, self._sealer, None)
            if why is not None:
                continue
            slot, stream, label = row[0], row[1], row[2]
            privacy = tuple(row[8:13])
            tag = self._sealer.open(stream, aad(slot, label, b"stream")).decode()
            rows = EncodedRows(np.empty(0), [float(scale)], [int(zp)], None, [codes], [logits])
            s_codes, s_logits, s_streams = seal_rows(self._sealer, rows, [slot], [label], tag, store_id,
                                                     privacy_bytes(privacy))
            check = checksum(slot, s_streams[0], label, s_codes[0], SEALED_SCALE, SEALED_ZERO_POINT, s_logits[0],
                             privacy)
            rewritten.append((0.0, s_streams[0], s_codes[0], SEALED_SCALE, SEALED_ZERO_POINT, s_logits[0], check, slot))
        with self._write() as updates:
            self._db.executemany("UPDATE records SET created_s=?, stream=?, codes=?, scale=?, zero_point=?, "
                                 "logits=?, checksum=? WHERE slot=?", rewritten)
            updates["encryption"] = enc

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
        self._slots.put(slot, label)

    def _open_meta(self, fingerprint: str | None, existed: bool) -> None:
        """Read and verify the metadata, reconcile it with the witness, then check or create it.

        A damaged or missing metadata value comes back from the witness with a ``RuntimeWarning``
        naming it; a database behind its witness (write-ahead log frames lost) is reported the
        same way, with how many writes and records went missing. A database file this open
        created is a new store: a witness left from a deleted one is overwritten.

        Raises:
            StoreError: metadata the records need is damaged and no witness holds it.
        """
        db = self._db
        meta, damaged = sql.read_meta(db)
        records = int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        witness, problem = self._witness.read() if self._witness is not None and existed else (None, None)
        if problem is not None:
            warnings.warn(f"replay store {str(self.path)!r}: its witness ({self.path.name}-witness) is damaged "
                          f"({problem}); writes lost from the database's write-ahead log before this open cannot "
                          "be detected. It is rewritten now.", RuntimeWarning, stacklevel=3)
        plan = reconcile(meta, damaged, witness, records)
        if plan.unrecoverable:
            raise StoreError(f"replay store {str(self.path)!r}: {damaged} metadata row(s) are damaged and "
                             f"{', '.join(plan.unrecoverable)} cannot be recovered (no witness holds them), so its "
                             f"{records} records cannot be decoded. Fix: restore the file and its -witness from a "
                             "backup, or move it aside and start a new store.")
        self._meta = plan.meta
        said = []
        if damaged or plan.restored:
            said.append(f"{damaged} damaged metadata row(s) dropped"
                        + (f", {', '.join(plan.restored)} restored from its witness" if plan.restored else ""))
        if plan.lost is not None:
            said.append(f"the database came back behind its witness, {plan.lost} (the write-ahead log was "
                        "damaged or lost, or the file was replaced by an older copy)")
        if said:
            warnings.warn(f"replay store {str(self.path)!r}: {'; '.join(said)}. The records it holds now are "
                          "verified and usable.", RuntimeWarning, stacklevel=3)
            with self._write() as updates:  # the repaired metadata, durable; the witness now agrees
                updates.update(plan.meta)
        version = self._meta.get("format_version")
        if version is None:
            with self._write() as updates:
                updates.update(format_version=sql.STORE_FORMAT_VERSION, config=asdict(self.config),
                               seen=int(self._meta.get("seen", 0)))
                if fingerprint is not None:
                    updates["fingerprint"] = fingerprint
                if self._sealer is not None:
                    updates["encryption"] = sql.key_check(self._sealer)
        else:
            try:
                check_format_version(f"replay store {str(self.path)!r}", version, sql.STORE_FORMAT_VERSION)
                sql.migrate(db, int(version))
                self._meta["format_version"] = max(int(version), sql.STORE_FORMAT_VERSION)
                enc = sql.check_key(db, self._meta.get("encryption"), self._sealer, self.path)
                if enc is not None:
                    with self._write() as updates:
                        updates["encryption"] = enc
                self.bind(fingerprint)
            except (FormatVersionError, FingerprintMismatchError, StoreKeyError):
                db.close()
                raise
        self._seen = int(self._meta.get("seen") or 0)
        if self._witness is not None and witness is None:
            self._write_witness()

    @contextlib.contextmanager
    def _write(self) -> Iterator[dict[str, Any]]:
        """One write transaction; metadata put in the yielded dict is written in it, with the
        write count, and the witness is rewritten once it commits."""
        updates: dict[str, Any] = {}
        with sql.transaction(self._db):
            yield updates
            updates["commits"] = int(self._meta.get("commits", 0)) + 1
            for k, v in updates.items():
                sql.set_meta(self._db, k, v)
        self._meta.update(updates)
        self._write_witness()

    def _write_witness(self) -> None:
        if self._witness is None:
            return
        doc = {k: self._meta[k] for k in (*IMMUTABLE_KEYS, *COUNTER_KEYS) if k in self._meta}
        try:
            self._witness.write({**doc, "records": len(self._slots)})
        except OSError as e:  # the database write stands; only the loss detection is weaker
            warnings.warn(f"replay store {str(self.path)!r}: its witness could not be written ({e}); writes "
                          "lost from the write-ahead log later may go unnoticed.", RuntimeWarning, stacklevel=4)

    @_locked
    def bind(self, fingerprint: str | None) -> None:
        """Tie the store to a model fingerprint; refuse one written by another model.

        Raises:
            FingerprintMismatchError: the store already belongs to another fingerprint.
        """
        if fingerprint is None:
            return
        stored = self._meta.get("fingerprint")
        if stored is not None and stored != fingerprint:
            raise FingerprintMismatchError(
                f"replay store {str(self.path)!r} was written by a model with fingerprint "
                f"{stored!r}; this model's is {fingerprint!r}. Fix: use a new store path for this "
                "model, or load the model the store belongs to."
            )
        if stored is None:
            with self._write() as updates:
                updates["fingerprint"] = fingerprint

    # ------------------------------------------------------------ properties
    @_locked
    def __len__(self) -> int:
        return len(self._slots)

    @property
    def seen(self) -> int:
        """How many records were ever offered to the store (the reservoir's stream length)."""
        return self._seen

    @property
    def capacity_records(self) -> int | None:
        """Records that fit the byte budget (known after the first append)."""
        if self._mirror:
            return int(self._mirror["label"].shape[0])
        cap = self._meta.get("capacity_records")  # the cached metadata: readable on a closed store too
        return None if cap is None else int(cap)

    @_locked
    def privacy_report(self) -> PrivacyReport:
        """What protects the records held now, in numbers and words (``str(report)``).

        Groups the records by the parameters each was written with and by stream; a stream's
        records together are accounted with Opacus' RDP accountant.
        """
        groups: dict[tuple[RecordPrivacy, str], int] = {}
        columns = ", ".join(sql.PRIVACY_COLUMNS)
        for row in self._db.execute(f"SELECT {columns}, stream, slot, label FROM records"):
            key = (RecordPrivacy(*row[:5]), self._stream_tag(row[5], row[6], row[7], row[:5]))
            groups[key] = groups.get(key, 0) + 1
        return summarize_privacy((p, stream, n) for (p, stream), n in groups.items())

    @_locked
    def slots(self) -> np.ndarray:
        """The slots that hold a record now, sorted ``(len(self),)`` int64 (for :meth:`read`)."""
        return self._slots.occupied()

    @_locked
    def bytes_used(self) -> int:
        """Bytes the store's files take on disk now: the database, its write-ahead log, its
        ``-shm`` index and its witness (what ``capacity_mb`` bounds). An in-memory store: its rows' bytes."""
        if str(self.path) == ":memory:":
            row = self._db.execute("SELECT COALESCE(SUM(LENGTH(codes) + COALESCE(LENGTH(logits), 0) + "
                                   "LENGTH(stream)), 0), COUNT(*) FROM records").fetchone()
            return int(row[0]) + budget.ROW_OVERHEAD_BYTES * int(row[1])
        total = 0
        for suffix in ("", "-wal", "-shm", "-witness"):
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(f"{self.path}{suffix}")
        return total

    @_locked
    def releases(self) -> list[dict[str, Any]]:
        """The releases of class statistics whose dreams this store received, oldest first
        (:mod:`edge_sleep.dreams`): each ``{"id", "epsilon", "delta", "max_norm", "mu", "rank"}``."""
        return [dict(r) for r in self._meta.get("releases", [])]

    @_locked
    def released(self, release_id: str) -> bool:
        """Whether the release ``release_id`` was recorded here."""
        return any(r["id"] == release_id for r in self._meta.get("releases", []))

    @_locked
    def record_release(self, release_id: str, params: dict[str, Any]) -> None:
        """Record, durably, that the day ``release_id`` was released with ``params``.

        Raises:
            StoreError: it was recorded already (releasing a day twice spends its budget twice).
        """
        if self.released(release_id):
            raise StoreError(f"replay store {str(self.path)!r}: the statistics {release_id!r} were released "
                             "already; releasing them again would spend their privacy budget twice.")
        with self._write() as updates:
            updates["releases"] = [*self._meta.get("releases", []), {"id": release_id, **params}]

    @_locked
    def class_counts(self) -> dict[int, int]:
        """``{label: records}`` currently held."""
        return self._slots.class_counts()

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

    def append(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        stream: str = "",
        privacy: RecordPrivacy | None = None,
    ) -> int:
        """Offer a batch to the store (:meth:`offer`); returns how many of its records the store
        now holds."""
        return int(np.count_nonzero(self.offer(latents, labels, logits, stream=stream, privacy=privacy) >= 0))

    @_locked
    def offer(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        stream: str = "",
        privacy: RecordPrivacy | None = None,
    ) -> np.ndarray:
        """Offer a batch to the store: each record is kept or dropped by the eviction policy, and
        the kept ones are written in one transaction.

        Args:
            latents: ``(N, ...)`` float (quantized to int8) or integer (kept exactly).
            labels: ``(N,)`` integer labels.
            logits: ``(N, C)`` logits to keep (fp16, saturated at +-65504), or ``None``.
            stream: a tag (task or stream name) kept with each record.
            privacy: the mechanism already applied to this batch
                (:func:`edge_sleep.privacy.privatize`), kept with each record for
                :meth:`privacy_report`; ``None``: none.

        Returns:
            ``(N,)`` int64: the slot that row ``i`` now occupies, or ``-1`` where it was dropped
            (or replaced by a later row of the same batch). A slot is reused when its record is
            evicted or deleted, so an app that keeps its own index of stored examples (an audit,
            a deletion request) overwrites an entry when its slot comes back.

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
        if not isinstance(stream, str) or len(stream.encode()) > 0xFFFF:
            raise InputError(f"append got stream={str(stream)[:40]!r}{'...' if len(str(stream)) > 40 else ''} "
                             f"({type(stream).__name__}); expected a str tag of at most 65535 UTF-8 bytes. "
                             "Fix: pass a short name for the task or the person (stream='alice').")
        flat = latents.detach().reshape(n, -1).cpu()
        bounds = row_bounds(flat) if flat.is_floating_point() and n > 0 else None
        if bounds is not None and not (torch.isfinite(bounds[0]).all() and torch.isfinite(bounds[1]).all()):
            raise InputError("append got non-finite latents (NaN or inf); expected finite values. "
                             "Fix: drop or clean those rows before storing them.")
        if logits is not None and not torch.isfinite(logits).all():
            raise InputError("append got non-finite logits (NaN or inf); expected finite values. "
                             "Fix: drop those rows, or pass logits=None.")
        if self.config.store_logits is False:
            logits = None
        layout = self._layout(latents, logits)
        if bounds is not None:
            self._check_range(torch.maximum(bounds[0].abs(), bounds[1].abs()))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        labels_l = [int(v) for v in labels.tolist()]
        cap = self.capacity_records or self._capacity_for(flat, logits, stream)
        if privacy is not None and privacy.epsilon is not None and privacy.delta is not None \
                and privacy.delta * cap >= 1:
            raise InputError(f"append got privacy {delta_problem(privacy.delta, cap)}; nothing is stored.")
        seen = self._seen
        before = self._slots.snapshot()
        chosen: list[tuple[int, int]] = []  # (row, slot)
        for i in range(n):
            seen += 1
            slot = self._slots.choose(labels_l[i], seen, cap, self.config.eviction, self.rng)
            if slot is not None:
                chosen.append((i, slot))
        if not chosen:  # nothing kept: no encoding, but the count of offered records is durable
            try:
                with self._write() as updates:
                    updates["seen"] = seen
            except BaseException:
                self._slots.restore(before)
                raise
            self._seen = seen
            return np.full(n, -1, dtype=np.int64)
        self._check_append_size(len(chosen), cap, flat, logits, stream)
        rows = torch.tensor([i for i, _ in chosen], dtype=torch.int64)
        enc = encode_rows(flat[rows], layout["latent_kind"], None if logits is None else logits.detach()[rows],
                          None if bounds is None else (bounds[0][rows], bounds[1][rows]))
        slot_l, label_l = [s for _, s in chosen], [labels_l[i] for i, _ in chosen]
        stored_codes, stored_logits = enc.code_bytes, enc.logit_bytes
        streams: list[str | bytes] = [stream] * len(chosen)
        dp = privacy or RecordPrivacy()
        dp_row = (dp.epsilon, dp.delta, dp.max_norm, dp.sigma, dp.label_epsilon)
        dp_bytes = privacy_bytes(dp_row)
        now = time.time()
        scales, zero_points = enc.scales, enc.zero_points
        if self._sealer is not None:  # the real scale and zero point are sealed with the codes; no time kept
            assert self._store_id is not None
            stored_codes, stored_logits, sealed = seal_rows(self._sealer, enc, slot_l, label_l, stream,
                                                            self._store_id, dp_bytes)
            streams = list(sealed)
            now = 0.0
            scales, zero_points = [SEALED_SCALE] * len(chosen), [SEALED_ZERO_POINT] * len(chosen)
        try:
            with self._write() as updates:
                if not self._mirror:  # the first records fix the layout and the capacity
                    updates.update(layout=layout, capacity_records=cap)
                self._db.executemany(sql.UPSERT, [
                    (s, now, streams[j], y, stored_codes[j], scales[j], zero_points[j], stored_logits[j],
                     checksum(s, streams[j], y, stored_codes[j], scales[j], zero_points[j],
                              stored_logits[j], dp_bytes),
                     *dp_row)
                    for j, (s, y) in enumerate(zip(slot_l, label_l))
                ])
                updates["seen"] = seen
        except BaseException:
            self._slots.restore(before)
            raise
        self._seen = seen
        if not self._mirror:
            self._alloc_mirror(layout, cap)
        # the mirror in one go per array (a slot written twice in this batch keeps its last record)
        slots = np.array(slot_l, dtype=np.int64)
        m = self._mirror
        m["codes"][slots] = enc.codes
        m["scale"][slots], m["zero_point"][slots] = enc.scales, enc.zero_points
        m["label"][slots] = label_l
        if enc.logits is not None and "logits" in m:
            m["logits"][slots] = enc.logits
        where = np.full(n, -1, dtype=np.int64)
        for slot, i in {slot: i for i, slot in chosen}.items():  # a slot written twice keeps its last row
            where[i] = slot
        return where

    def _check_range(self, absmax: torch.Tensor) -> None:
        """Warn once when a row's largest value is far beyond what the store's records hold, or,
        before the store holds ``_RANGE_MIN_RECORDS`` records, far beyond unit scale.

        Such a row (raw 0-255 pixels, or one row scaled by 100 among inputs in [0, 1]) is stored
        like any other, but its gradients dwarf the others' and can make a night diverge or its
        Fisher overflow (the night is then abandoned and undone).
        """
        if self._range_warned:
            return
        held = len(self._slots)
        if held < _RANGE_MIN_RECORDS:
            typical, against = 1.0, "unit scale (the store holds too few records to compare with)"
        else:
            if self._typical_absmax is None or held >= 2 * self._typical_absmax[0]:  # refreshed as the store grows
                occupied = self._slots.occupied()
                m = self._mirror
                scale, zp = m["scale"][occupied].astype(np.float64), m["zero_point"][occupied].astype(np.float64)
                per_record = np.maximum(np.abs(scale * (-128 - zp)), np.abs(scale * (127 - zp)))
                self._typical_absmax = (held, float(np.median(per_record)))
            typical = max(self._typical_absmax[1], 1e-12)
            against = f"the typical largest value of the {held} records held ({typical:.4g})"
        worst = int(torch.argmax(absmax))
        if float(absmax[worst]) > _RANGE_FACTOR * typical:
            self._range_warned = True
            warnings.warn(
                f"replay store {str(self.path)!r}: row {worst} of this batch reaches {float(absmax[worst]):.4g}, "
                f"{float(absmax[worst]) / typical:.0f}x {against}. It is stored, but a row that far out dominates "
                "replay and can make a night diverge or its Fisher overflow (the night is then abandoned and "
                "undone). Fix: scale every input the same way (e.g. pixels / 255) before learn(). "
                "Said once per store.", RuntimeWarning, stacklevel=4)

    def _row_bytes(self, flat: torch.Tensor, logits: torch.Tensor | None, stream: str) -> int:
        """Bytes of one row of this layout in SQLite; the stream tag counted at least ``_STREAM_BYTES``
        (sealed: padded, :func:`~edge_sleep.store.codec.pad_stream`)."""
        code_bytes = flat.shape[1] * (1 if flat.is_floating_point() else 8)
        tag = len(pad_stream(stream)) if self._sealer is not None else len(stream.encode())
        return budget.row_bytes(code_bytes, None if logits is None else int(logits.shape[1]),
                                max(tag, _STREAM_BYTES), self._sealer is not None)

    def _check_append_size(self, kept: int, cap: int, flat: torch.Tensor, logits: torch.Tensor | None,
                           stream: str) -> None:
        """Warn once when this append's transaction rewrites more pages than the write-ahead log's
        share of the budget leaves room for: an append is atomic, so until the next checkpoint
        the log holds every page it rewrote and the files exceed ``capacity_mb``."""
        if self._size_warned or str(self.path) == ":memory:":
            return
        page = self._page
        budget_mb = self.config.capacity_mb
        row = self._row_bytes(flat, logits, stream)
        pages = budget.pages_rewritten(kept, cap, row, page)  # once full: slots drawn from all of them
        room = budget.append_pages(budget_mb, page)
        ratio = budget.peak_bytes(budget_mb, cap, row, page, pages) / (budget_mb * 1e6)
        if pages <= room or ratio <= 1.0:
            return
        self._size_warned = True
        low, high = 1, kept  # the largest append that fits (at least 1)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if budget.pages_rewritten(mid, cap, row, page) <= room else (low, mid - 1)
        fits = low
        warnings.warn(
            f"replay store {str(self.path)!r}: this append keeps {kept} records; once the store is full "
            f"such an append replaces records on about {pages} pages of the database in one transaction, "
            f"so until the next checkpoint the write-ahead log holds all of them and the files reach up to about {ratio:.2f}x "
            f"capacity_mb={budget_mb} ({room} pages fit its log's share). Fix: learn or append in batches "
            f"of at most {fits} records, or raise capacity_mb. Said once per store.", RuntimeWarning, stacklevel=4)

    def _capacity_for(self, flat: torch.Tensor, logits: torch.Tensor | None, stream: str) -> int:
        """Records that fit the byte budget on disk (:mod:`edge_sleep.store.budget`), from the
        size of one row of this layout; stream tags are counted at their first length, at least
        ``_STREAM_BYTES``."""
        row = self._row_bytes(flat, logits, stream)
        page = self._page
        cap = budget.capacity_for(self.config.capacity_mb, row, page)
        if self.config.capacity_records is not None:
            cap = min(cap, self.config.capacity_records)
        if cap < 1:
            raise InputError(
                f"capacity_mb={self.config.capacity_mb} leaves no room for one record of {row} bytes (about "
                f"{budget.disk_bytes_per_record(row, page):.0f} on disk) beside the store's fixed "
                f"{budget.fixed_bytes(self.config.capacity_mb, page)} bytes (schema pages, write-ahead log, "
                f"index); expected room for at least one. Fix: raise capacity_mb."
            )
        return cap

    @_locked
    def delete(self, slots: np.ndarray | list[int]) -> int:
        """Delete the records at ``slots`` (a user's request to be forgotten, say) in one
        transaction, then checkpoint, so that with ``secure_delete`` they are gone from the
        database file and its write-ahead log. Their slots are reused first by the next records.

        Returns:
            How many records were deleted (slots that held none are skipped).

        Raises:
            InputError: a slot that is not an integer in ``[0, capacity)``; nothing is deleted.
        """
        wanted = [int(s) for s in np.asarray(slots, dtype=np.int64).reshape(-1)]
        cap = self.capacity_records or 0
        bad = [s for s in wanted if not 0 <= s < cap]
        if bad:
            raise InputError(f"delete got slots {bad[:5]}; expected integers in [0, {cap}) (the store's "
                             "capacity). Fix: pass slots from slots(), offer() or WakeStats.slots.")
        return self._delete(sorted({s for s in wanted if s in self._slots.labels}), quarantine=False)

    @_locked
    def forget(self, stream: str) -> int:
        """Forget a stream (a user's request to be forgotten): delete every record kept with
        stream tag ``stream``, and every quarantined record, in one transaction, then checkpoint,
        so that with ``secure_delete`` they are gone from the database file and its write-ahead
        log. A quarantined record failed its checksum, so its tag cannot say whose it is; it is
        never replayed, so emptying the quarantine loses nothing a night uses.

        Returns:
            How many records were deleted from the store (quarantined ones not counted).
        """
        if not isinstance(stream, str):
            raise InputError(f"forget got stream={stream!r}; expected the str tag the records were "
                             "offered with. Fix: pass the same stream= as learn() or append().")
        return self._delete(self.stream_slots(stream).tolist(), quarantine=True)

    def _delete(self, held: list[int], *, quarantine: bool) -> int:
        """Delete the records at ``held`` (slots that hold one) and, with ``quarantine``, the whole
        quarantine table, in one transaction; then truncate the log."""
        purge = quarantine and self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='quarantine'").fetchone() is not None
        if not held and not purge:
            return 0
        before = self._slots.snapshot()
        try:
            with self._write():
                self._db.executemany("DELETE FROM records WHERE slot=?", [(s,) for s in held])
                if purge:
                    self._db.execute("DELETE FROM quarantine")
                self._slots.remove(held)  # before the commit: the witness counts what is held after it
        except BaseException:
            self._slots.restore(before)
            raise
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return len(held)

    @_locked
    def stream_slots(self, stream: str) -> np.ndarray:
        """The slots of the records kept with stream tag ``stream``, sorted (opened with the
        store's key when it is encrypted)."""
        columns = ", ".join(sql.PRIVACY_COLUMNS)
        rows = self._db.execute(f"SELECT stream, slot, label, {columns} FROM records")
        return np.array(sorted(row[1] for row in rows if self._stream_tag(row[0], row[1], row[2], row[3:]) == stream),
                        dtype=np.int64)

    def _stream_tag(self, stored: str | bytes, slot: int, label: int, privacy: tuple[Any, ...]) -> str:
        """A record's stream tag as written: opened with the store's key where it is sealed."""
        if self._sealer is not None and isinstance(stored, bytes):
            assert self._store_id is not None
            bound = record_aad(self._store_id, slot, label, privacy_bytes(tuple(privacy)), b"stream")
            return unpad_stream(self._sealer.open(stored, bound))
        return str(stored)

    # ----------------------------------------------------------------- reads
    @_locked
    def sample(self, n: int, *, balanced: bool = False, exclude: np.ndarray | None = None) -> ReplayBatch:
        """Draw ``min(n, len(self))`` records without replacement.

        Args:
            n: records wanted.
            balanced: draw classes uniformly first, then records within each class.
            exclude: slots never drawn (a night's probe records).

        Raises:
            StoreError: the store is empty, or holds nothing outside ``exclude``.
        """
        if not len(self._slots):
            raise StoreError(f"replay store {str(self.path)!r} is empty; call learn() (or append) "
                             "before sampling from it.")
        slots = self._slots.sample(n, self.rng, balanced=balanced, exclude=exclude)
        if not len(slots):
            raise StoreError(f"replay store {str(self.path)!r} holds no record outside the {0 if exclude is None else len(exclude)} "
                             "excluded; expected at least one to sample. Fix: exclude fewer records")
        return self.read(slots)

    @_locked
    def read(self, slots: np.ndarray) -> ReplayBatch:
        """Decode the records at ``slots``, in that order."""
        return decode_rows(self._meta_layout(), self._mirror, np.asarray(slots, dtype=np.int64))

    def _meta_layout(self) -> Any:
        return self._meta.get("layout")

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
            db = getattr(self, "_db", None)
            try:
                if db is not None:
                    if self._meta.get("seen") != self._seen:
                        with self._write() as updates:
                            updates["seen"] = self._seen
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sql.STORAGE_ERRORS:
                pass  # the records are committed; only the stream length may be older
            finally:
                if db is not None:
                    db.close()
                self._closed = reason
                self._release()

    def __enter__(self) -> ReplayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
