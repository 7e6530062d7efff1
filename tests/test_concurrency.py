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


@pytest.mark.parametrize("alias", ["symlink", "hardlink"])
def test_another_path_to_the_same_file_is_refused_while_a_process_holds_it(tmp_path: Path, alias: str) -> None:
    """Issue 21: a symbolic or hard link got around the lock (480 of 960 records overwritten)."""
    path = tmp_path / "d" / "r.db"
    path.parent.mkdir()
    ReplayStore(path).close()  # the file exists, so a hard link can be made
    other = tmp_path / "alias.db"
    (other.symlink_to if alias == "symlink" else other.hardlink_to)(path)
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        with pytest.raises(StoreBusyError, match="symbolic or hard link"):
            ReplayStore(other)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    store = ReplayStore(other)  # free again, through either name
    store.append(torch.rand(2, 4), torch.tensor([0, 1]))
    store.close()
    assert len(ReplayStore(path)) == 2


def test_in_one_process_a_hard_link_takes_over_like_the_same_path(tmp_path: Path) -> None:
    first = ReplayStore(tmp_path / "r.db")
    first.append(torch.rand(2, 4), torch.tensor([0, 1]))
    (tmp_path / "link.db").hardlink_to(tmp_path / "r.db")
    second = ReplayStore(tmp_path / "link.db")
    assert len(second) == 2
    with pytest.raises(StoreError, match="another ReplayStore in this process"):
        len(first)
    second.close()


def test_two_threads_opening_one_store_at_once_end_with_one_open_store(tmp_path: Path) -> None:
    """Issue 21: 9 of 40 tries raised AttributeError ('_db') and left the first store open."""
    for attempt in range(20):
        path = tmp_path / f"r{attempt}.db"
        barrier = threading.Barrier(2)
        opened: list[ReplayStore] = []
        errors: list[BaseException] = []

        def open_it() -> None:
            barrier.wait()
            try:
                opened.append(ReplayStore(path))
            except BaseException as e:  # noqa: BLE001 - recorded and checked below
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(opened) == 2
        usable = []
        for store in opened:
            try:
                len(store)
                usable.append(store)
            except StoreError as e:
                assert "another ReplayStore in this process" in str(e)
        assert len(usable) == 1  # the last opener holds it; the other says why it is closed
        usable[0].append(torch.rand(1, 4), torch.tensor([0]))
        usable[0].close()
        ReplayStore(path).close()  # nothing left locked


def test_a_closed_stores_properties_answer_or_say_it_is_closed(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / "r.db", StoreConfig(capacity_records=8))
    store.append(torch.rand(3, 4), torch.tensor([0, 1, 2]))
    store.close()
    assert store.capacity_records == 8 and store.seen == 3
    for call in (lambda: len(store), store.bytes_used, store.slots, lambda: store.sample(1)):
        with pytest.raises(StoreError, match="closed"):
            call()


def test_a_failed_learn_leaves_the_stores_generator_where_it_was(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: a retried learn after a failed store write did not match a clean run of the same seed."""
    def runtime(name: str) -> EdgeSleep:
        torch.manual_seed(0)
        es = EdgeSleep(small_mlp(), store=tmp_path / f"{name}.db", seed=3,
                       wake=WakeConfig(replay_batch=4))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(8, 8, generator=g)
            es.learn(x, (x[:, 0] > 0).long())
        return es

    clean, retried = runtime("clean"), runtime("retried")
    x = torch.randn(8, 8)
    y = (x[:, 0] > 0).long()
    with monkeypatch.context() as m:
        def full(*args: object, **kwargs: object) -> None:
            raise StoreError("disk full (simulated)")
        m.setattr(retried.store, "offer", full)
        with pytest.raises(StoreError, match="simulated"):
            retried.learn(x, y)
    retried.learn(x, y)
    clean.learn(x, y)
    assert retried.store.rng.bit_generator.state == clean.store.rng.bit_generator.state
    for a, b in zip(clean.model.parameters(), retried.model.parameters()):
        torch.testing.assert_close(a, b)
    clean.store.close()
    retried.store.close()
