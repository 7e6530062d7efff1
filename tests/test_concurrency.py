"""Threads, processes and failed writes: one writer per store, any thread, both-or-neither learn."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.errors import StoreBusyError, StoreError
from edge_sleep.store import ReplayStore
from tests.conftest import small_mlp

HOLD = """
import sys, time
from edge_sleep.store import ReplayStore
store = ReplayStore(sys.argv[1])
print("open", flush=True)
time.sleep(60)
"""


def test_a_second_process_gets_store_busy_until_the_first_dies(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        with pytest.raises(StoreBusyError, match="open for writing elsewhere.*own store path"):
            ReplayStore(path)
    finally:
        child.send_signal(signal.SIGKILL)  # no close(): the kernel drops the lock with the process
        child.wait()
    store = ReplayStore(path)  # free again
    store.append(torch.rand(3, 4), torch.tensor([0, 1, 2]))
    assert len(store) == 3
    store.close()


def test_in_one_process_the_last_opener_takes_the_store_and_the_first_says_so(tmp_path: Path) -> None:
    first = ReplayStore(tmp_path / "r.db")
    first.append(torch.rand(2, 4), torch.tensor([0, 1]))
    second = ReplayStore(tmp_path / "r.db")
    assert len(second) == 2
    with pytest.raises(StoreError, match="closed .*another ReplayStore in this process"):
        first.append(torch.rand(1, 4), torch.tensor([0]))
    second.close()
    second.close()  # twice is fine
    with pytest.raises(StoreError, match="closed by close"):
        len(second)


def test_learn_and_sleep_from_a_worker_thread_and_close_from_another(tmp_path: Path) -> None:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", wake=WakeConfig(train="all"),
                   sleep=SleepConfig(min_steps=5))
    errors: list[BaseException] = []
    reports = []

    def worker() -> None:
        try:
            for i in range(5):
                g = torch.Generator().manual_seed(i)
                es.learn(torch.rand(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
            reports.append(es.sleep())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors and reports and reports[0].completed
    closer = threading.Thread(target=es.store.close)
    closer.start()
    closer.join()
    with pytest.raises(StoreError, match="closed"):
        es.store.sample(1)
    # the file was really released: it opens again, with the worker's records
    assert len(ReplayStore(tmp_path / "r.db")) == len([1 for _ in range(40)])


def test_concurrent_learn_calls_are_serialized_and_lose_nothing(tmp_path: Path) -> None:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", wake=WakeConfig(train="adapters"),
                   store_config=StoreConfig(capacity_records=10_000))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(15):
                g = torch.Generator().manual_seed(seed * 100 + i)
                es.learn(torch.rand(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
                es.predict(torch.rand(2, 8))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert es.wake_steps_since_sleep == 45 and len(es.store) == 180 and es.store.seen == 180
    rows = sqlite3.connect(tmp_path / "r.db").execute("SELECT COUNT(*) FROM records").fetchone()[0]
    assert rows == 180


@pytest.mark.parametrize("train", ["all", "adapters"])
def test_a_failed_write_undoes_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train: str) -> None:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", wake=WakeConfig(train=train, momentum=0.9)
                   if "momentum" in WakeConfig.__dataclass_fields__ else WakeConfig(train=train))
    es.learn(torch.rand(8, 8), torch.randint(0, 3, (8,)))
    weights = {n: p.detach().clone() for n, p in es.model.named_parameters()}
    optimizer = es._engine.optimizer.state_dict()
    records, seen, steps = len(es.store), es.store.seen, es.wake_steps_since_sleep

    def locked(*args: object, **kwargs: object) -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(es.store, "offer", locked)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        es.learn(torch.rand(8, 8), torch.randint(0, 3, (8,)))
    for n, p in es.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert str(es._engine.optimizer.state_dict()) == str(optimizer)
    assert (len(es.store), es.store.seen, es.wake_steps_since_sleep) == (records, seen, steps)
    monkeypatch.undo()
    es.learn(torch.rand(8, 8), torch.randint(0, 3, (8,)))  # and it goes on working
    assert es.wake_steps_since_sleep == steps + 1


def test_the_lock_file_is_private_and_beside_the_store(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "r.db")
    lock = tmp_path / "r.db-lock"
    assert lock.exists() and (os.stat(lock).st_mode & 0o777) == 0o600
    store.close()
    started = time.perf_counter()
    ReplayStore(tmp_path / "r.db").close()  # never waits on a free store
    assert time.perf_counter() - started < 5
