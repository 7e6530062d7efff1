"""Replay store throughput and size: appends (batched and single), samples, with and without encryption.

    python benchmarks/store.py

writes ``benchmarks/results/store.json`` with ``appends_per_s_batched`` (records a second, batches
of 128 P-MNIST-sized records: 784 floats quantized to int8, 10 fp16 logits), ``appends_per_s_single``
(one record a call), ``samples_per_s`` (records a second drawn by ``sample(128)``),
``appends_per_s_encrypted`` (batched, AES-GCM), ``bytes_per_record`` (the database file after a
checkpoint, divided by the records it holds) and ``fp32_bytes_per_record`` (the same record as
float32 latents and logits plus an int64 label). Each figure is the median of 5 runs; the plain and
encrypted stores are measured alternately in one process, so their ratio is side by side.
Targets (issue 6): at least 20,000 appends/s batched, encryption under 2x, records at least 3.5x
smaller than float32.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from edge_sleep.bench.provenance import provenance
from edge_sleep.config import StoreConfig
from edge_sleep.store import ReplayStore

RESULTS = Path(__file__).resolve().parent / "results"
DIM, CLASSES, BATCH, CAPACITY = 784, 10, 128, 10_000


def appends_per_s(folder: Path, *, key: bytes | None, batch: int, records: int) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(records, DIM, generator=g)
    y = torch.randint(0, CLASSES, (records,), generator=g)
    logits = torch.randn(records, CLASSES, generator=g)
    path = folder / f"r-{time.perf_counter_ns()}.db"
    store = ReplayStore(path, StoreConfig(capacity_records=CAPACITY, capacity_mb=1000), seed=0, key=key)
    t0 = time.perf_counter()
    for i in range(0, records, batch):
        store.append(x[i:i + batch], y[i:i + batch], logits[i:i + batch], stream="task-1")
    rate = records / (time.perf_counter() - t0)
    store.checkpoint()
    size = path.stat().st_size // max(1, len(store))
    store.close()
    return rate, size


def samples_per_s(folder: Path) -> float:
    store = ReplayStore(folder / "sample.db", StoreConfig(capacity_records=CAPACITY, capacity_mb=1000), seed=0)
    store.append(torch.rand(CAPACITY, DIM), torch.randint(0, CLASSES, (CAPACITY,)), torch.randn(CAPACITY, CLASSES))
    draws = 200
    t0 = time.perf_counter()
    for _ in range(draws):
        store.sample(BATCH)
    rate = draws * BATCH / (time.perf_counter() - t0)
    store.close()
    return rate


def main() -> dict[str, Any]:
    key = os.urandom(32)
    plain, enc, single, sizes = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for _ in range(5):
            rate, size = appends_per_s(folder, key=None, batch=BATCH, records=20_000)
            plain.append(rate)
            sizes.append(size)
            enc.append(appends_per_s(folder, key=key, batch=BATCH, records=20_000)[0])
            single.append(appends_per_s(folder, key=None, batch=1, records=2_000)[0])
        sampled = statistics.median(samples_per_s(folder) for _ in range(5))
    fp32 = DIM * 4 + CLASSES * 4 + 8
    result = {
        "command": "python benchmarks/store.py",
        "appends_per_s_batched": statistics.median(plain),
        "appends_per_s_single": statistics.median(single),
        "samples_per_s": sampled,
        "appends_per_s_encrypted": statistics.median(enc),
        "bytes_per_record": statistics.median(sizes),
        "fp32_bytes_per_record": fp32,
    }
    result["encryption_cost_x"] = result["appends_per_s_batched"] / result["appends_per_s_encrypted"]
    result["size_ratio_vs_fp32"] = fp32 / result["bytes_per_record"]
    result["targets"] = {
        "appends_per_s_batched_at_least_20000": result["appends_per_s_batched"] >= 20_000,
        "encryption_under_2x": result["encryption_cost_x"] < 2.0,
        "at_least_3.5x_smaller": result["size_ratio_vs_fp32"] >= 3.5,
    }
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "store.json.tmp"
    result.update(provenance())  # the commit the numbers describe
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS / "store.json")
    for k, v in result.items():
        print(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
