"""kill -9 at random moments of an append, a night and a save: nothing committed is lost or damaged.

A child process works in a loop and reports each step it finished on stdout; the parent kills it
with SIGKILL at a random moment, then checks what a restarted app would find.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep
from edge_sleep.config import StoreConfig
from edge_sleep.store import ReplayStore
from tests.conftest import small_mlp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")]

CHILD = textwrap.dedent("""
    import hashlib, sys, torch
    from pathlib import Path
    from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
    from tests.conftest import small_mlp
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    def digest(es):
        return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in es.model.parameters())).hexdigest()[:16]
    if (folder / "ckpt").exists():
        es = EdgeSleep.load(folder / "ckpt", small_mlp())
    else:
        es = EdgeSleep(small_mlp(), store=folder / "r.db", store_config=StoreConfig(capacity_records=64),
                       wake=WakeConfig(train="all", replay_batch=0),
                       sleep=SleepConfig(min_steps=400, fisher_steps=50, batch_size=16))
    g = torch.Generator().manual_seed(0)
    print("ready", flush=True)
    while True:
        x = torch.randn(16, 8, generator=g)
        stats = es.learn(x, (x[:, 0] > 0).long())
        print(f"appended seen={es.store.seen}", flush=True)
        if mode == "save":
            h = digest(es)
            print(f"saving {h}", flush=True)
            es.save(folder / "ckpt")
            print(f"saved {h}", flush=True)
        elif mode == "sleep":
            print("sleeping", flush=True)
            es.sleep()
            print("slept", flush=True)
""")


def run_and_kill(folder: Path, mode: str, after_lines: int, rng: random.Random) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while len(lines) < after_lines:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the child ended early: {proc.stderr.read() if proc.stderr else ''}")
        lines.append(line.strip())
    time.sleep(rng.uniform(0.0, 0.05))  # a random moment inside the next step
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    lines += [x for x in rest.splitlines() if x]
    return lines


def check_store(path: Path, min_seen: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a quarantined (damaged) record would warn
        store = ReplayStore(path, StoreConfig(capacity_records=64), seed=0)
    try:
        assert store.seen >= min_seen  # every committed append counted
        if len(store):
            batch = store.read(store.slots())
            assert torch.isfinite(batch.x).all() and len(batch.y) == len(store)
        return store.seen
    finally:
        store.close()


@pytest.mark.parametrize("trial", range(4))
def test_kill_during_appends(tmp_path: Path, trial: int) -> None:
    rng = random.Random(trial)
    lines = run_and_kill(tmp_path, "append", rng.randint(3, 30), rng)
    committed = [int(x.split("=")[1]) for x in lines if x.startswith("appended")]
    check_store(tmp_path / "r.db", max(committed, default=0))


@pytest.mark.parametrize("trial", range(4))
def test_kill_during_saves_leaves_the_old_or_the_new_checkpoint(tmp_path: Path, trial: int) -> None:
    rng = random.Random(100 + trial)
    lines = run_and_kill(tmp_path, "save", rng.randint(4, 40), rng)
    saved = [x.split()[1] for x in lines if x.startswith("saved ")]
    saving = [x.split()[1] for x in lines if x.startswith("saving ")]
    if not saved:
        return
    es = EdgeSleep.load(tmp_path / "ckpt", small_mlp())
    import hashlib

    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in es.model.parameters())).hexdigest()[:16]
    assert h in (saved[-1], saving[-1])  # complete: the last finished save, or the one under way
    es.store.close()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt") and p.name != "ckpt"]
    assert not leftovers or all(".old" in n or ".tmp" in n for n in leftovers)
    check_store(tmp_path / "r.db", 0)


def test_kill_during_a_night_then_the_app_restarts(tmp_path: Path) -> None:
    rng = random.Random(7)
    # first a checkpoint, then a night killed part-way
    lines = run_and_kill(tmp_path, "save", 6, rng)
    assert any(x.startswith("saved") for x in lines)
    lines = run_and_kill(tmp_path, "sleep", 3, rng)  # killed inside the first night
    assert "sleeping" in lines and "slept" not in lines
    es = EdgeSleep.load(tmp_path / "ckpt", small_mlp())  # the checkpoint before the night
    assert all(torch.isfinite(p).all() for p in es.model.parameters())
    es.learn(torch.randn(16, 8), torch.randint(0, 2, (16,)))  # and the app goes on
    assert es.sleep(steps=20).completed
    es.store.close()
