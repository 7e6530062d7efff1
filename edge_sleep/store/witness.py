"""A durable witness of the store's state, kept outside SQLite's write-ahead log.

Two faults make SQLite lose data without a word. A bit flipped in one frame of the write-ahead
log makes it discard that frame and every later one, so committed records and the counters that
would tell roll back together. A bit flipped in a metadata key makes the key vanish from lookups,
and a store without ``capacity_records`` reads as empty. The witness, ``<store>-witness``, is
rewritten after every committed write with the metadata that never changes (format, layout,
capacity, fingerprint, key check) and the counters that only grow (``commits``, ``seen``), plus
the record count. On open, :func:`reconcile` compares the database against it: a damaged or
missing metadata value is restored from it, and a database behind it is reported as lost writes.

The file holds two fixed slots written in turn, each with a sequence number and a CRC32, so a torn
write leaves the other slot readable. A write is one ``pwrite`` to the page cache (no ``fsync``):
it survives a killed process, as the database's committed transactions do (``synchronous=NORMAL``).
After a power cut both may lose their last writes; the witness then says what the database lost.

Example:
    >>> import tempfile
    >>> w = Witness(tempfile.mkdtemp() + "/r.db")
    >>> w.write({"commits": 3, "seen": 40, "records": 32})
    >>> w.read()
    ({'commits': 3, 'records': 32, 'seen': 40}, None)
    >>> r = reconcile({"commits": 2, "seen": 8}, 0, {"commits": 3, "seen": 40, "records": 32}, 8)
    >>> r.lost
    '1 committed write(s) are missing: records held 32 -> 8, records offered 40 -> 8'
    >>> w.close()
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["COUNTER_KEYS", "IMMUTABLE_KEYS", "Reconciled", "Witness", "reconcile"]

MAGIC = b"ESW1"
SLOT_BYTES = 4096
_HEADER = struct.Struct("<4sQII")  # magic, sequence, payload length, crc32 of the payload
# set once (at creation or at the first append), never changed afterwards
IMMUTABLE_KEYS = ("format_version", "layout", "capacity_records", "fingerprint", "encryption")
# only ever grow
COUNTER_KEYS = ("commits", "seen")


class Witness:
    """``<path>-witness``: the last committed metadata and counters, in two alternating slots."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(f"{path}-witness")
        self._fd: int | None = None
        self._seq = 0

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(document, problem)``: the newest slot that checks out, or ``None`` and why not
        (``problem`` is ``None`` when there is simply no witness yet)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"it cannot be read ({e})"
        best: tuple[int, dict[str, Any]] | None = None
        for k in range(2):
            doc = _parse_slot(raw[k * SLOT_BYTES:(k + 1) * SLOT_BYTES])
            if doc is not None and (best is None or doc[0] > best[0]):
                best = doc
        if best is None:
            return None, "neither of its two slots checks out"
        self._seq = max(self._seq, best[0])
        return best[1], None

    def write(self, doc: dict[str, Any]) -> None:
        """Write ``doc`` to the older slot (one ``pwrite``; the newer slot stays intact)."""
        payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if _HEADER.size + len(payload) > SLOT_BYTES:
            raise ValueError(f"the store's witness holds at most {SLOT_BYTES - _HEADER.size} bytes, got "
                             f"{len(payload)}; this is a bug in edge-sleep")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._seq += 1
        block = _HEADER.pack(MAGIC, self._seq, len(payload), zlib.crc32(payload)) + payload
        os.pwrite(self._fd, block.ljust(SLOT_BYTES, b"\0"), (self._seq % 2) * SLOT_BYTES)

    def close(self) -> None:
        """fsync and close the file (the witness outlives a power cut after a clean close)."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def _parse_slot(raw: bytes) -> tuple[int, dict[str, Any]] | None:
    if len(raw) < _HEADER.size:
        return None
    magic, seq, length, crc = _HEADER.unpack_from(raw)
    payload = raw[_HEADER.size:_HEADER.size + length]
    if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return (seq, doc) if isinstance(doc, dict) else None


@dataclass
class Reconciled:
    """What :func:`reconcile` decided.

    Attributes:
        meta: the metadata to use (the database's, with restored values).
        restored: keys whose database value was damaged or missing and came from the witness.
        unrecoverable: keys damaged in the database with no witness copy.
        lost: what the database lost against the witness, in words, or ``None``.
    """

    meta: dict[str, Any]
    restored: list[str] = field(default_factory=list)
    unrecoverable: list[str] = field(default_factory=list)
    lost: str | None = None


def reconcile(meta: dict[str, Any], damaged: int, witness: dict[str, Any] | None, records: int) -> Reconciled:
    """Compare the database's metadata (``damaged`` rows failed their checksum and are left out
    of ``meta``; ``records`` rows are in the records table) with the witness.

    Immutable keys missing from the database come back from the witness (they were committed
    once, and are never removed). A counter behind the witness means lost writes: ``lost`` says
    how many, and how the record count and the offered count went back. Without a witness, a
    damaged row whose key cannot be known leaves the keys a store with records needs in
    ``unrecoverable``.
    """
    out = Reconciled(dict(meta))
    w = witness or {}
    # a database with no metadata at all was lost whole (or deleted on purpose, its witness left
    # behind): it starts anew, with the loss reported, rather than inheriting a fingerprint
    fresh = not meta and not damaged and not records
    for key in IMMUTABLE_KEYS if not fresh else ():
        if key not in out.meta and key in w:
            out.meta[key] = w[key]
            out.restored.append(key)
    for key in COUNTER_KEYS:
        if key not in out.meta and damaged and key in w:
            out.meta[key] = w[key]
            out.restored.append(key)
    if witness is not None and int(w.get("commits", 0)) > int(out.meta.get("commits", 0)):
        parts = [f"{int(w['commits']) - int(out.meta.get('commits', 0))} committed write(s) are missing"]
        if int(w.get("records", records)) != records:
            parts.append(f"records held {int(w['records'])} -> {records}")
        if int(w.get("seen", 0)) > int(out.meta.get("seen", 0)):
            parts.append(f"records offered {int(w['seen'])} -> {int(out.meta.get('seen', 0))}")
        out.lost = ": ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if parts[1:] else "")
        # the stream length is what was offered, lost or not: the reservoir keeps counting from there
        out.meta["seen"] = max(int(out.meta.get("seen", 0)), int(w.get("seen", 0)))
    if damaged and records:
        needed = ("format_version", "layout", "capacity_records")
        out.unrecoverable = [k for k in needed if k not in out.meta]
        if "seen" not in out.meta:
            out.meta["seen"] = records  # at least what is held was offered
            out.restored.append("seen")
    return out
