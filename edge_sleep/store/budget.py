"""The store's byte budget as files on disk: page size, write-ahead log bound, records that fit.

``StoreConfig.capacity_mb`` bounds what the store's files take on disk, open or closed: the
database, its write-ahead log (``-wal``), its shared-memory index (``-shm``) and its witness
(``-witness``, :mod:`edge_sleep.store.witness`). Pure functions
over SQLite's file format (https://www.sqlite.org/fileformat2.html):

* a record's row is its fields plus about 90 bytes of SQLite and edge-sleep overhead (record
  header, cell, fixed-width columns, the five privacy parameters), sealing adds 28 bytes (nonce and
  tag) to each sealed field and 16 to the codes (the scale and zero point sealed with them), and
  rows pack whole into B-tree pages, the rest of a page unused;
* the write-ahead log gets :func:`wal_pages` of the budget: it is checkpointed once it holds
  :func:`checkpoint_pages` and truncated back to that size, so it holds at most that plus one
  transaction, and a transaction that rewrites up to the rest (:func:`append_pages`) keeps the
  files within the budget; a larger one (an append whose records land on more pages) exceeds it
  until the next checkpoint, which :func:`pages_rewritten` estimates;
* the ``-shm`` index takes 32 KiB while the store is open, the witness 8 KiB, and a few pages
  hold the schema and the metadata.

Example:
    >>> page = page_size_for(1.0)
    >>> row = row_bytes(code_bytes=784, num_logits=10, stream_bytes=0, sealed=False)
    >>> capacity_for(1.0, row, page) * disk_bytes_per_record(row, page) < 1e6
    True
"""

from __future__ import annotations

import math

__all__ = ["FIXED_PAGES", "SHM_BYTES", "WITNESS_BYTES", "append_pages", "capacity_for", "checkpoint_pages",
           "disk_bytes_per_record", "fixed_bytes", "page_size_for", "pages_per_record", "pages_rewritten", "peak_bytes",
           "row_bytes", "wal_pages"]

SHM_BYTES = 32768  # the WAL index while the store is open (SQLite's smallest)
WITNESS_BYTES = 8192  # the witness file's two slots (edge_sleep.store.witness)
FIXED_PAGES = 6  # the schema, the metadata table and its index, the records' root, the quarantine's
SEAL_BYTES = 28  # AES-GCM: 12-byte nonce and 16-byte tag per sealed field
# SQLite's record header and cell (sizes, rowid, pointer) and the fixed-width columns: creation
# time, scale, zero point, label, checksum and the five privacy parameters
ROW_OVERHEAD_BYTES = 92
WAL_SHARE = 0.10  # of the budget, for the write-ahead log: frames before a checkpoint and one transaction
LEAF_HEADER = 8


def page_size_for(capacity_mb: float) -> int:
    """4 KiB pages below 8 MB (fixed pages and the log cost less), 16 KiB above (rows pack tighter)."""
    return 4096 if capacity_mb < 8 else 16384


def wal_pages(capacity_mb: float, page: int) -> int:
    """Frames (a page and its 24-byte header) the write-ahead log may hold: ``WAL_SHARE`` of the
    budget, at least 8."""
    return max(8, int(WAL_SHARE * capacity_mb * 1e6) // (page + 24))


def checkpoint_pages(capacity_mb: float, page: int) -> int:
    """Frames after which a commit checkpoints the log (``wal_autocheckpoint``), and the size the
    log is truncated back to (``journal_size_limit``): a quarter of :func:`wal_pages`."""
    return max(2, wal_pages(capacity_mb, page) // 4)


def append_pages(capacity_mb: float, page: int) -> int:
    """Pages one transaction may rewrite with the files staying within the budget."""
    return wal_pages(capacity_mb, page) - checkpoint_pages(capacity_mb, page)


def pages_per_record(row: int, page: int) -> int:
    """Pages a record's row spans: its leaf, plus its overflow pages when it does not fit one."""
    return max(1, round(disk_bytes_per_record(row, page) / page)) if row > page - 35 else 1


def pages_rewritten(records: int, held: int, row: int, page: int) -> int:
    """Expected pages a transaction rewrites when it writes ``records`` rows into random slots of a
    store of ``held`` records: the distinct leaves they land on (each leaf holds several rows), the
    rows' overflow pages, and two more (the metadata and an interior page)."""
    per_leaf = max(1, int(page // disk_bytes_per_record(row, page))) if row <= page - 35 else 1
    leaves = max(1, -(-held // per_leaf))
    distinct = leaves * (1 - (1 - 1 / leaves) ** records)
    overflow = (pages_per_record(row, page) - 1) * records
    return math.ceil(distinct) + overflow + 2


def fixed_bytes(capacity_mb: float, page: int) -> int:
    """What the files take whatever the records: fixed pages, the log's bound and the ``-shm`` index."""
    return FIXED_PAGES * page + wal_pages(capacity_mb, page) * (page + 24) + SHM_BYTES + WITNESS_BYTES


def row_bytes(code_bytes: int, num_logits: int | None, stream_bytes: int, sealed: bool) -> int:
    """Bytes of one record's row in SQLite: its blobs and tag (sealed or not) plus the overhead."""
    seal = SEAL_BYTES if sealed else 0
    logits = 0 if num_logits is None else 2 * num_logits + seal
    scale_zp = 16 if sealed else 0  # a sealed record keeps its scale and zero point inside its codes
    return code_bytes + scale_zp + seal + logits + stream_bytes + seal + ROW_OVERHEAD_BYTES


def disk_bytes_per_record(row: int, page: int) -> float:
    """Bytes of database file per record: whole rows per leaf page, or a row's local part plus its
    overflow pages when it does not fit in one page, and a share of the interior pages."""
    usable = page - LEAF_HEADER
    max_local = page - 35  # the largest payload a table leaf keeps in the page
    if row <= max_local:
        per_leaf = usable // (row + 2)  # each cell also takes a 2-byte pointer
        leaf = page / max(per_leaf, 1)
    else:
        min_local = (page - 12) * 32 // 255 - 23
        local = min_local + (row - min_local) % (page - 4)
        if local > max_local:
            local = min_local
        overflow = math.ceil((row - local) / (page - 4))
        leaf = page / max(usable // (local + 4 + 2), 1) + overflow * page
    return leaf * (1 + 16 / page)  # an interior cell (child pointer and key) per leaf


def capacity_for(capacity_mb: float, row: int, page: int) -> int:
    """Records whose rows fit the budget beside the fixed bytes (0: not even one)."""
    room = capacity_mb * 1e6 - fixed_bytes(capacity_mb, page)
    return max(0, int(room // disk_bytes_per_record(row, page)))


def peak_bytes(capacity_mb: float, records: int, row: int, page: int, rewritten: int) -> float:
    """The files' size while a transaction that rewrote ``rewritten`` pages waits for its
    checkpoint, with ``records`` rows in the database: the fixed pages, the ``-shm`` index and the
    witness, the rows, and a log of :func:`checkpoint_pages` plus those pages."""
    log = (checkpoint_pages(capacity_mb, page) + rewritten) * (page + 24)
    return FIXED_PAGES * page + SHM_BYTES + WITNESS_BYTES + records * disk_bytes_per_record(row, page) + log
