"""The on-disk replay store: one SQLite database in WAL mode (design.md section 4).

Each record keeps a latent as int8 codes with a per-row scale and zero point (integer inputs
such as token ids are kept exactly), its label, optionally the fp16 logits the model gave when the
record was written, a stream/task tag, the privacy parameters it was written with and a CRC32
checksum over all of it. Capacity is a byte budget; once full, new records replace old ones by
reservoir sampling (uniform over everything ever offered) or class-balanced eviction (the largest
class gives up a record). Every append is one transaction, so a crash leaves either the whole
batch or none of it.

The package, one module a concern:

* :mod:`~edge_sleep.store.codec`: a record's bytes (quantized codes, fp16 logits, the checksum,
  sealing under the app's key, decoding and verifying a stored row);
* :mod:`~edge_sleep.store.database`: the SQLite file (connection, schema, metadata, migration
  of older formats, quarantine of damaged records, storage errors as ``StoreError``);
* :mod:`~edge_sleep.store.policy`: which slot a new record takes and which records a replay draws;
* :mod:`~edge_sleep.store.replay`: :class:`ReplayStore`, which ties them together with one
  writer per file and an in-memory mirror for sampling.

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

from edge_sleep.store.codec import ReplayBatch
from edge_sleep.store.database import STORE_FORMAT_VERSION
from edge_sleep.store.replay import ReplayStore

__all__ = ["ReplayStore", "ReplayBatch", "STORE_FORMAT_VERSION"]
