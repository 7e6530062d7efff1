"""Fault campaign: how the replay store, the runtime and the CLI behave when things go wrong.

    python benchmarks/faults.py            # the full campaign, about 2 to 5 minutes on 2 cores
    python benchmarks/faults.py --quick    # a few tries per scenario, about 20 to 40 seconds
    python benchmarks/faults.py --quick --only threads_open closed_store_props --out /tmp/f.json

Each scenario injects one kind of fault many times (a ``kill -9`` at a random moment of a child
process's learn, save or night; one flipped bit in the database's record pages, in its metadata or
in its write-ahead log; two paths to one store; threads racing to open or save; bad command-line
arguments; a byte budget streamed past; raw 0-255 pixels; a failed store write) and classifies
every try as exactly one of:

- ``clean``: the operation worked and nothing was lost; or it failed with an
  :class:`~edge_sleep.errors.EdgeSleepError` (the CLI: exit code 2 and a last stderr line that
  names the path or the value, no traceback); or a ``RuntimeWarning``/``UserWarning`` said what
  was lost;
- ``raw``: any other exception (``AttributeError``, ``sqlite3.*``, ``OSError``, a ``RuntimeError``
  that is no ``EdgeSleepError``...), a traceback or another exit code from the CLI, a child that
  crashed or hung;
- ``silent``: no error and no warning, but records were lost or changed (fewer than were
  committed, another ``seen`` or ``capacity_records``, a record whose content differs), litter left
  behind (temporary checkpoint folders), or the files over their byte budget (size scenarios).

Writes ``benchmarks/results/faults.json``: ``commit``, ``commit_dirty`` (this script's checkout),
``library_commit``, ``library_dirty`` (the ``edge_sleep`` under test), ``quick``, ``seconds`` and
``scenarios`` (``{name: {"tries", "clean", "raw", "silent", "notes"}}``, ``notes`` being up to 5
short descriptions of the failures seen; the size scenarios add ``max_ratio``, the largest
bytes-on-disk over ``capacity_mb * 1e6`` seen). Child processes come from a fork server that
imports torch once, so a kill try costs tens of milliseconds, not a second of imports.

``benchmarks/results/faults_before.json`` is the same campaign against an earlier library: a copy
of this file run inside a checkout of that commit, with the checkout on ``PYTHONPATH``
(``git worktree add /tmp/base 527aaed && cp benchmarks/faults.py /tmp/base/benchmarks/ && cd
/tmp/base && PYTHONPATH=$PWD python benchmarks/faults.py --out .../faults_before.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.conftest:small_mlp`, the CLI's --model in these tries; appended, so an
    sys.path.append(str(ROOT))  # edge_sleep on PYTHONPATH (another checkout under test) comes first

import edge_sleep  # noqa: E402
from edge_sleep import EdgeSleep  # noqa: E402
from edge_sleep.bench.provenance import provenance  # noqa: E402
from edge_sleep.config import SleepConfig, StoreConfig, WakeConfig  # noqa: E402
from edge_sleep.errors import EdgeSleepError, StoreError  # noqa: E402
from edge_sleep.store import ReplayStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "faults.json"
MODEL_SPEC = "tests.conftest:small_mlp"
DIM, CLASSES = 784, 10  # P-MNIST-sized records for the store scenarios
CHILD_WAIT_S = 60.0  # longest wait for a child's next line before it counts as hung


def small_mlp() -> nn.Module:
    """The tests' small MLP (8 -> 16 -> 16 -> 3): cheap checkpoints and nights."""
    from tests.conftest import small_mlp as make

    return make()


# ------------------------------------------------------------------ outcomes
class Outcome(NamedTuple):
    """One try's class (``clean``, ``raw`` or ``silent``), what went wrong, and a measured value."""

    kind: str
    note: str = ""
    value: float | None = None


def clean(note: str = "", value: float | None = None) -> Outcome:
    return Outcome("clean", note, value)


def raw(note: str, value: float | None = None) -> Outcome:
    return Outcome("raw", note, value)


def silent(note: str, value: float | None = None) -> Outcome:
    return Outcome("silent", note, value)


def short(e: BaseException | str, limit: int = 150) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def from_error(e: BaseException, where: str) -> Outcome:
    """An exception: clean when it is an ``EdgeSleepError``, raw otherwise."""
    if isinstance(e, EdgeSleepError):
        return clean(f"{where}: {short(e)}")
    return raw(f"{where}: {short(e)}")


def worst(outcomes: list[Outcome]) -> Outcome:
    """The try's class from its checks: raw before silent before clean (the first of each)."""
    for kind in ("raw", "silent"):
        for o in outcomes:
            if o.kind == kind:
                return o
    return outcomes[0] if outcomes else clean()


def _from_torch(w: warnings.WarningMessage) -> bool:
    return f"{os.sep}torch{os.sep}" in w.filename or f"{os.sep}torchao{os.sep}" in w.filename


@contextlib.contextmanager
def recorded() -> Iterator[list[str]]:
    """The texts of the ``RuntimeWarning``/``UserWarning`` s raised inside (not torch's own)."""
    texts: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield texts
    texts += [str(w.message) for w in seen
              if issubclass(w.category, (RuntimeWarning, UserWarning)) and not _from_torch(w)]


# --------------------------------------------------------------- the data
def records(g: torch.Generator, n: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random records: latents ``(n, dim)``, labels, logits ``(n, 10)``."""
    return torch.rand(n, dim, generator=g), torch.randint(0, CLASSES, (n,), generator=g), torch.randn(n, CLASSES,
                                                                                                       generator=g)


def snapshot(store: ReplayStore) -> dict[int, bytes]:
    """``{slot: bytes of its decoded latent, label and logits}`` of every record held."""
    if not len(store):
        return {}
    b = store.read(store.slots())
    logits = b.logits if b.logits is not None else torch.zeros(len(b.y), 0)
    return {int(s): b.x[i].numpy().tobytes() + int(b.y[i]).to_bytes(8, "little") + logits[i].numpy().tobytes()
            for i, s in enumerate(b.slots.tolist())}


def compare(before: dict[int, bytes], after: dict[int, bytes]) -> tuple[int, int]:
    """``(lost, changed)``: records of ``before`` missing from ``after``, and those whose content differs."""
    lost = sum(1 for s in before if s not in after)
    changed = sum(1 for s, v in before.items() if s in after and after[s] != v)
    return lost, changed


def build_store(path: Path, n: int, *, key: bytes | None = None, seed: int = 0,
                config: StoreConfig | None = None, batch: int = 25) -> dict[str, Any]:
    """A store of ``n`` records written in batches (one transaction each) and closed cleanly."""
    g = torch.Generator().manual_seed(seed)
    store = ReplayStore(path, config or StoreConfig(capacity_records=1000), seed=0, key=key)
    try:
        for i in range(0, n, batch):
            store.append(*records(g, min(batch, n - i)), stream="task-1")
        return {"snapshot": snapshot(store), "seen": store.seen, "capacity": store.capacity_records,
                "len": len(store)}
    finally:
        store.close()


def dir_bytes(folder: Path, name: str) -> int:
    return sum((folder / f"{name}{s}").stat().st_size for s in ("", "-wal", "-shm", "-witness", "-lock")
               if (folder / f"{name}{s}").exists())


# ------------------------------------------------------ child processes
# Children come from a fork server that imported torch and edge_sleep once; each runs one of the
# child_* functions below (this file, loaded by path) and reports each finished step as a line in
# its log. The parent waits for a random number of lines, waits a random moment more, then kills.
_BOOT = "import runpy; runpy.run_path(FILE, run_name='faults_child')['child_main'](NAME, LOG, ARGS)"
_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        # what a child would otherwise import itself (torch._dynamo alone takes a second)
        _CTX.set_forkserver_preload(["torch", "torch._dynamo", "torch.func", "edge_sleep", "edge_sleep.runtime",
                                     "edge_sleep.store", "edge_sleep.sleep", "edge_sleep.fisher", "tests.conftest"])
    return _CTX


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """Hide this process's main module while a child starts, so that multiprocessing does not run
    the main script again in the child (it needs none of it: ``_BOOT`` loads this file by path)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def child_main(name: str, log: str, args: tuple[Any, ...]) -> None:
    """The child's entry: its output to files beside its log, then ``child_<name>(report, *args)``."""
    folder = Path(log).parent
    out = os.open(folder / "child.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def report(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    try:
        globals()[f"child_{name}"](report, *args)
    except BaseException as e:  # the parent classifies it
        report(f"error {int(isinstance(e, EdgeSleepError))} {short(e, 300)}")
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(3)
    os._exit(0)


class Child:
    """A child process running ``child_<name>``; ``kill()`` (or leaving the ``with``) ends it."""

    def __init__(self, name: str, folder: Path, *args: Any) -> None:
        self.folder = folder
        self.log = folder / "child.log"
        self.log.touch()
        code = {"FILE": str(Path(__file__).resolve()), "NAME": name, "LOG": str(self.log), "ARGS": args}
        self.proc = _context().Process(target=exec, args=(_BOOT, code), daemon=True)
        self.hung: float | None = None  # the timeout of a wait_for that ran out while the child was alive
        with _without_main():
            self.proc.start()

    def lines(self) -> list[str]:
        text = self.log.read_text(errors="replace")
        return text[:text.rfind("\n") + 1].splitlines()

    def wait_for(self, done: Callable[[list[str]], bool], timeout: float = CHILD_WAIT_S) -> list[str]:
        """Poll the log until ``done(lines)``, the child ends, or ``timeout``; returns the lines."""
        end = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if done(lines) or not self.proc.is_alive():
                return lines
            if time.monotonic() > end:
                self.hung = timeout
                return lines
            time.sleep(0.002)

    def kill(self) -> list[str]:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(30)
        return self.lines()

    def failure(self) -> Outcome | None:
        """Why the child ended on its own (an error it reported, or a crash), or hung; else ``None``."""
        if self.hung is not None:
            return raw(f"child hung: no progress for {self.hung:.0f} s")
        if self.proc.exitcode in (None, -signal.SIGKILL):
            return None
        errors = [x for x in self.lines() if x.startswith("error ")]
        if errors:
            _, edge, text = errors[-1].split(" ", 2)
            return clean(f"child: {text}") if edge == "1" else raw(f"child: {text}")
        code = self.proc.exitcode
        if code < 0:
            return raw(f"child crashed ({signal.Signals(-code).name})")
        out = self.folder / "child.out"
        tail = out.read_text(errors="replace").strip().splitlines()[-1:] if out.exists() else []
        return raw(f"child exited {code} {short(tail[0]) if tail else ''}".strip())

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def count_lines(prefix: str, k: int) -> Callable[[list[str]], bool]:
    return lambda lines: sum(1 for x in lines if x.startswith(prefix)) >= k


def last_committed(lines: list[str]) -> tuple[int, int]:
    """``(seen, records)`` of the last ``committed SEEN RECORDS`` line, ``(0, 0)`` if none."""
    done = [x.split() for x in lines if x.startswith("committed ")]
    return (int(done[-1][1]), int(done[-1][2])) if done else (0, 0)


def learner(folder: Path, capacity: int, night: bool = False) -> EdgeSleep:
    """The runtime the kill scenarios' children (and the parent's checks) use."""
    return EdgeSleep(small_mlp(), store=folder / "r.db", store_config=StoreConfig(capacity_records=capacity),
                     wake=WakeConfig(train="all", replay_batch=8),
                     sleep=SleepConfig(min_steps=300, fisher_steps=50, batch_size=16) if night else None)


def labelled(g: torch.Generator, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def child_learn(report: Callable[[str], None], folder: str, capacity: int, seed: int) -> None:
    es = learner(Path(folder), capacity)
    g = torch.Generator().manual_seed(seed)
    while True:
        es.learn(*labelled(g))
        report(f"committed {es.store.seen} {len(es.store)}")


def child_save(report: Callable[[str], None], folder: str, capacity: int, seed: int) -> None:
    es = learner(Path(folder), capacity)
    g = torch.Generator().manual_seed(seed)
    while True:
        es.learn(*labelled(g))
        report(f"committed {es.store.seen} {len(es.store)}")
        report("saving")
        es.save(Path(folder) / "ckpt")
        report("saved")


def child_sleep(report: Callable[[str], None], folder: str, capacity: int, seed: int) -> None:
    es = learner(Path(folder), capacity, night=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        es.learn(*labelled(g))
    es.save(Path(folder) / "ckpt")
    report(f"committed {es.store.seen} {len(es.store)}")
    report("saved")
    while True:
        es.learn(*labelled(g))
        report(f"committed {es.store.seen} {len(es.store)}")
        report("sleeping")
        es.sleep()
        report("slept")
        es.save(Path(folder) / "ckpt")
        report("saved")


def child_wal(report: Callable[[str], None], folder: str, key_hex: str, appends: int, seed: int) -> None:
    store = ReplayStore(Path(folder) / "r.db", StoreConfig(capacity_records=1000), seed=0,
                        key=bytes.fromhex(key_hex) if key_hex else None)
    g = torch.Generator().manual_seed(seed)
    for _ in range(appends):
        store.append(*records(g, 16), stream="task-2")
        report(f"committed {store.seen} {len(store)}")
    report("done")
    time.sleep(3600)  # killed here, its store never closed


def child_hold(report: Callable[[str], None], folder: str) -> None:
    store = ReplayStore(Path(folder) / "r.db", StoreConfig(capacity_records=100), seed=0)
    store.append(*records(torch.Generator().manual_seed(0), 10))
    report("open")
    time.sleep(3600)


def child_try(report: Callable[[str], None], name: str, folder: str, seed: int, i: int) -> None:
    outcome = SCENARIOS[name][0](Path(folder), random.Random(seed), i)
    report("outcome " + json.dumps(list(outcome)))


def isolated(name: str, d: Path, seed: int, i: int) -> Outcome:
    """Try ``i`` of scenario ``name`` in a child process: a crash there (a race inside SQLite's C
    code can segfault) or a hang is a raw outcome of that try, not the end of the campaign."""
    with Child("try", d, name, str(d), seed, i) as child:
        lines = child.wait_for(lambda lines: any(x.startswith("outcome ") for x in lines), timeout=180)
        child.kill()
        done = [x for x in lines if x.startswith("outcome ")]
        if done:
            kind, note, value = json.loads(done[-1][len("outcome "):])
            return Outcome(kind, note, value)
        return child.failure() or raw("the try's process ended without an outcome")


# ------------------------------------------------------------ kill -9
def reopen_runtime_store(folder: Path, capacity: int, seen: int, held: int) -> Outcome:
    """Open the store a killed child wrote; every record it reported committed must be there."""
    try:
        with recorded() as warned:
            es = EdgeSleep(small_mlp(), store=folder / "r.db", store_config=StoreConfig(capacity_records=capacity))
    except Exception as e:
        return from_error(e, "reopen")
    try:
        store = es.store
        want = min(held, capacity)
        if store.seen < seen or len(store) < want:
            what = f"seen {store.seen} (committed {seen}), {len(store)} records (committed {want})"
            return clean(f"lost, with a warning: {what}") if warned else silent(f"lost: {what}")
        if len(store) and not torch.isfinite(store.read(store.slots()).x).all():
            return silent("a record decodes to non-finite values")
        return clean()
    except Exception as e:
        return from_error(e, "after reopen")
    finally:
        es.store.close()


def try_kill_during_learn(d: Path, rng: random.Random, i: int) -> Outcome:
    capacity = rng.choice([64, 4096])  # with eviction, and without
    if i % 2:  # a store from an earlier session, closed cleanly
        es = learner(d, capacity)
        g = torch.Generator().manual_seed(1000 + i)
        for _ in range(5):
            es.learn(*labelled(g))
        es.store.close()
    with Child("learn", d, str(d), capacity, i) as child:
        child.wait_for(count_lines("committed", rng.randint(1, 30)))
        time.sleep(rng.uniform(0.0, 0.01))
        lines = child.kill()
        if (why := child.failure()) is not None:
            return why
    return reopen_runtime_store(d, capacity, *last_committed(lines))


def leftovers(d: Path, name: str = "ckpt") -> list[Outcome]:
    """A silent outcome when folders a write left behind (``.ckpt.*``: temporary or old) sit beside
    checkpoint ``name``; none otherwise."""
    # the random part of a temporary folder's name masked, so that one note stands for them all
    left = sorted(re.sub(r"[a-z0-9_]{8}$", "*", p.name) for p in d.iterdir()
                  if p.is_dir() and p.name.startswith(f".{name}."))
    return [silent(f"{len(left)} folder(s) left beside the checkpoint: {left[0]}")] if left else []


def check_checkpoint(d: Path, saved: bool, g: torch.Generator) -> list[Outcome]:
    """The checkpoint loads (when a save finished), learns, saves again; no temporary folder is left."""
    checks: list[Outcome] = []
    try:
        with recorded() as warned:
            es = EdgeSleep.load(d / "ckpt", small_mlp())
    except Exception as e:
        if not saved and isinstance(e, EdgeSleepError):  # killed inside the first save: nothing to load
            es = learner(d, 64)
        else:
            return [from_error(e, "load after kill")]
    try:
        es.learn(*labelled(g))
        es.save(d / "ckpt")
        if warned:
            checks.append(clean(f"load warned: {short(warned[0])}"))
    except Exception as e:
        checks.append(from_error(e, "save after kill"))
    finally:
        es.store.close()
    checks += leftovers(d)
    return checks


def try_kill_during_save(d: Path, rng: random.Random, i: int) -> Outcome:
    with Child("save", d, str(d), 64, i) as child:
        child.wait_for(count_lines("saving", rng.randint(1, 12)))
        time.sleep(rng.uniform(0.0, 0.03))
        lines = child.kill()
        if (why := child.failure()) is not None:
            return why
    seen, held = last_committed(lines)
    return worst(check_checkpoint(d, "saved" in lines, torch.Generator().manual_seed(i))
                 + [reopen_runtime_store(d, 64, seen, held)])


def try_kill_during_sleep(d: Path, rng: random.Random, i: int) -> Outcome:
    with Child("sleep", d, str(d), 64, i) as child:
        child.wait_for(count_lines("sleeping", rng.randint(1, 2)), timeout=120)
        time.sleep(rng.uniform(0.0, 0.5))  # a night of 300 small steps takes about half a second
        lines = child.kill()
        if (why := child.failure()) is not None:
            return why
    seen, held = last_committed(lines)
    checks = [reopen_runtime_store(d, 64, seen, held)]
    try:
        with recorded():
            es = EdgeSleep.load(d / "ckpt", small_mlp())
    except Exception as e:
        return worst(checks + [from_error(e, "load after a killed night")])
    try:
        es.learn(*labelled(torch.Generator().manual_seed(i)))
        with recorded() as warned:
            report = es.sleep(steps=20)
        if not report.completed:
            checks.append(clean(f"night refused, warned: {warned[:1]}") if warned
                          else silent(f"the next night did not complete ({report.aborted})"))
        es.save(d / "ckpt")
    except Exception as e:
        checks.append(from_error(e, "night after a killed night"))
    finally:
        es.store.close()
    checks += leftovers(d)
    return worst(checks)


# ------------------------------------------------------------- bit flips
def pages_of(path: Path, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of the pages of tables/indexes ``names`` (SQLite's dbstat)."""
    db = sqlite3.connect(str(path))
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        marks = ",".join("?" * len(names))
        pages = db.execute(f"SELECT DISTINCT pageno FROM dbstat WHERE name IN ({marks})", names).fetchall()
    finally:
        db.close()
    return [((p - 1) * size, p * size) for (p,) in pages]


def meta_spans(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the ``meta`` table's keys and values: in its leaf cells (key then value) and
    in its primary-key index (the key again), found in the pages of those two b-trees."""
    db = sqlite3.connect(str(path))
    try:
        rows = db.execute("SELECT key, value FROM meta").fetchall()
    finally:
        db.close()
    data = path.read_bytes()
    spans: set[tuple[int, int]] = set()
    for start, end in pages_of(path, ("meta", "sqlite_autoindex_meta_1")):
        page = data[start:end]
        for key, value in rows:
            for needle in (key.encode(), (key + value).encode()):
                at = page.find(needle)
                while at >= 0:
                    spans.add((start + at, start + at + len(needle)))
                    at = page.find(needle, at + 1)
    return sorted(spans)


def flip_bit(path: Path, spans: list[tuple[int, int]], rng: random.Random) -> int:
    """Flip one random bit inside ``spans`` (chosen by their length); returns its byte offset."""
    total = sum(b - a for a, b in spans)
    k = rng.randrange(total)
    for a, b in spans:
        if k < b - a:
            offset = a + k
            break
        k -= b - a
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return offset


def reopen_and_compare(path: Path, key: bytes | None, before: dict[str, Any], *, append: bool) -> Outcome:
    """Reopen a damaged store: an ``EdgeSleepError`` or a warning is clean; fewer or changed records,
    another ``seen`` or ``capacity_records``, with neither, are silent. Then (``append``) one more
    batch must not overwrite an original record (the store is far from full)."""
    try:
        with recorded() as warned:
            store = ReplayStore(path, StoreConfig(capacity_records=1000), seed=0, key=key)
    except Exception as e:
        return from_error(e, "reopen")
    try:
        with recorded() as warned_more:
            now = snapshot(store)
            lost, changed = compare(before["snapshot"], now)
            problems = []
            if lost or changed:
                problems.append(f"{lost} record(s) lost, {changed} changed of {len(before['snapshot'])}")
            if store.seen != before["seen"]:
                problems.append(f"seen {before['seen']} -> {store.seen}")
            if store.capacity_records != before["capacity"]:
                problems.append(f"capacity_records {before['capacity']} -> {store.capacity_records}")
            if problems and not warned:
                return silent("; ".join(problems))
            if append:
                store.append(*records(torch.Generator().manual_seed(99), 16), stream="after")
                lost2, changed2 = compare({s: v for s, v in before["snapshot"].items() if s in now}, snapshot(store))
                if (lost2 or changed2) and not (warned or warned_more):
                    return silent(f"an append after reopening overwrote {lost2 + changed2} original record(s)")
        return clean()
    except Exception as e:
        return from_error(e, "use after reopen")
    finally:
        store.close()


def try_bitflip_db(d: Path, rng: random.Random, i: int, *, encrypted: bool = False) -> Outcome:
    key = os.urandom(32) if encrypted else None
    before = build_store(d / "r.db", 200, key=key, seed=i)
    flip_bit(d / "r.db", pages_of(d / "r.db", ("records",)), rng)
    return reopen_and_compare(d / "r.db", key, before, append=True)


def try_bitflip_db_encrypted(d: Path, rng: random.Random, i: int) -> Outcome:
    return try_bitflip_db(d, rng, i, encrypted=True)


def try_bitflip_meta(d: Path, rng: random.Random, i: int, *, encrypted: bool = False) -> Outcome:
    key = os.urandom(32) if encrypted else None
    before = build_store(d / "r.db", 200, key=key, seed=i)
    flip_bit(d / "r.db", meta_spans(d / "r.db"), rng)
    return reopen_and_compare(d / "r.db", key, before, append=True)


def try_bitflip_meta_encrypted(d: Path, rng: random.Random, i: int) -> Outcome:
    return try_bitflip_meta(d, rng, i, encrypted=True)


def try_bitflip_wal(d: Path, rng: random.Random, i: int, *, encrypted: bool = False) -> Outcome:
    key = os.urandom(32) if encrypted else None
    first_session = i % 2 == 0  # the store is created by the killed process itself
    if not first_session:
        build_store(d / "r.db", 40, key=key, seed=i)
    with Child("wal", d, str(d), key.hex() if key else "", rng.randint(2, 8), i) as child:
        lines = child.wait_for(lambda lines: "done" in lines)
        child.kill()
        if (why := child.failure()) is not None:
            return why
        if "done" not in lines:
            return raw("child hung before its appends finished")
    # in place, as a restarted app finds the files (whatever edge_sleep keeps beside the database
    # included); the first connection rebuilds the -shm index from the damaged log
    wal = d / "r.db-wal"
    if not wal.exists() or wal.stat().st_size <= 32:
        return clean("no WAL frames to damage")
    flip_bit(wal, [(32, wal.stat().st_size)], rng)
    seen, held = last_committed(lines)
    try:
        with recorded() as warned:
            store = ReplayStore(d / "r.db", StoreConfig(capacity_records=1000), seed=0, key=key)
    except Exception as e:
        return from_error(e, "reopen")
    try:
        if store.seen < seen or len(store) < held:
            what = (f"{'first' if first_session else 'second'} session: seen {store.seen} (committed {seen}), "
                    f"{len(store)} records (committed {held})")
            return clean(f"warned: {what}") if warned else silent(f"rolled back: {what}")
        return clean()
    except Exception as e:
        return from_error(e, "use after reopen")
    finally:
        store.close()


def try_bitflip_wal_encrypted(d: Path, rng: random.Random, i: int) -> Outcome:
    return try_bitflip_wal(d, rng, i, encrypted=True)


# ------------------------------------------------------------ concurrency
ALIASES = ("symlink", "hardlink", "folder symlink")


def try_aliased_path(d: Path, rng: random.Random, i: int) -> Outcome:
    kind = ALIASES[i % len(ALIASES)]
    with Child("hold", d, str(d)) as child:
        child.wait_for(lambda lines: "open" in lines)
        if (why := child.failure()) is not None:
            return why
        if kind == "symlink":
            alias = d / "link.db"
            alias.symlink_to(d / "r.db")
        elif kind == "hardlink":
            alias = d / "hard.db"
            os.link(d / "r.db", alias)
        else:
            (d / "alias").symlink_to(d, target_is_directory=True)
            alias = d / "alias" / "r.db"
        try:
            store = ReplayStore(alias, StoreConfig(capacity_records=100), seed=0)
        except Exception as e:
            return from_error(e, kind)
        store.close()
        return silent(f"a second process opened the open store through a {kind}")


def run_threads(targets: list[Callable[[], Any]], timeout: float = 60.0) -> tuple[list[Any], list[BaseException], bool]:
    """Start ``targets`` together (a barrier); ``(results, errors, hung)``."""
    barrier = threading.Barrier(len(targets))
    results: list[Any] = []
    errors: list[BaseException] = []

    def run(target: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            results.append(target())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results, errors, any(t.is_alive() for t in threads)


def thread_errors(errors: list[BaseException], hung: bool, where: str) -> list[Outcome]:
    out = [from_error(e, where) for e in errors]
    if hung:
        out.append(raw(f"{where}: a thread hung"))
    return out


def try_threads_open(d: Path, rng: random.Random, i: int) -> Outcome:
    path = d / "r.db"
    held = build_store(path, 50, seed=i)["len"] if i % 2 else 0
    stores, errors, hung = run_threads([lambda: ReplayStore(path, seed=0)] * 2)
    checks = thread_errors(errors, hung, "open")
    usable = []
    for s in stores:
        try:
            len(s)
            usable.append(s)
        except Exception as e:
            checks.append(clean() if isinstance(e, EdgeSleepError) else from_error(e, "len of a raced store"))
    if len(usable) == 2:
        checks.append(silent("both threads hold the store open"))
    elif not usable and not errors:
        checks.append(silent("both opens returned, neither store is usable"))
    for s in stores:
        try:
            s.close()
        except Exception as e:
            checks.append(from_error(e, "close"))
    try:
        with ReplayStore(path, seed=0) as again:
            if len(again) < held:
                checks.append(silent(f"{held - len(again)} records lost"))
    except Exception as e:
        checks.append(silent(f"reopen after both closed: {short(e)}") if isinstance(e, EdgeSleepError)
                      else from_error(e, "reopen"))
    return worst(checks)


def check_loads(d: Path) -> list[Outcome]:
    """After concurrent saves: the checkpoint loads and nothing is left beside it."""
    checks: list[Outcome] = []
    try:
        es = EdgeSleep.load(d / "ckpt", small_mlp())
        es.store.close()
    except Exception as e:  # every save reported success: a checkpoint that does not load is lost
        checks.append(silent(f"load: {short(e)}") if isinstance(e, EdgeSleepError) else from_error(e, "load"))
    checks += leftovers(d)
    return checks


def try_threads_learn_save(d: Path, rng: random.Random, i: int) -> Outcome:
    if i % 2 == 0:  # one runtime: two threads learn while two save
        es = learner(d, 256)
        g = torch.Generator().manual_seed(i)
        batches = [labelled(g) for _ in range(16)]

        def learns(part: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for x, y in part:
                es.learn(x, y)

        def saves() -> None:
            for _ in range(4):
                es.save(d / "ckpt")

        es.learn(*batches[0])
        _, errors, hung = run_threads([lambda: learns(batches[:8]), lambda: learns(batches[8:]), saves, saves])
        where = "learn/save threads"
        runtimes = [es]
    else:  # eight runtimes, each with its own store, save to one folder at once
        runtimes = [EdgeSleep(small_mlp(), store=d / f"r{k}.db", wake=WakeConfig(train="all")) for k in range(8)]
        for k, es in enumerate(runtimes):
            es.learn(*labelled(torch.Generator().manual_seed(k)))

        def save_twice(es: EdgeSleep) -> None:
            es.save(d / "ckpt")
            es.save(d / "ckpt")

        _, errors, hung = run_threads([functools.partial(save_twice, es) for es in runtimes])
        where = "8 runtimes saving"
    for es in runtimes:
        es.store.close()
    checks = thread_errors(errors, hung, where)
    return worst(checks + check_loads(d))


# ---------------------------------------------------------------- the CLI
def cli_in_process(argv: list[str]) -> tuple[int, str]:
    """``edge_sleep.cli.main(argv)`` in this process: ``(exit code, stderr)``; an exception that
    escapes ``main`` is a traceback on stderr and exit code 1, as ``python -m`` would give."""
    from edge_sleep.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), recorded():
        try:
            code: Any = main(argv)
        except SystemExit as e:
            code = e.code
        except Exception:
            traceback.print_exc()
            code = 1
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        err.write(code + "\n")
        code = 1
    return int(code or 0), err.getvalue()


def cli_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``python -m edge_sleep.cli ARGV`` run from ``cwd``, with this process's edge_sleep and ``tests``."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    try:
        done = subprocess.run([sys.executable, "-m", "edge_sleep.cli", *argv], cwd=cwd, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return -1, "timed out after 300 s"
    return done.returncode, done.stderr


def checkpoint(d: Path, name: str = "ckpt") -> Path:
    """A small saved runtime (the tests' MLP) with 48 records in its store (closed)."""
    es = EdgeSleep(small_mlp(), store=d / f"{name}.db", wake=WakeConfig(train="all"))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        es.learn(*labelled(g))
    es.save(d / name)
    es.store.close()
    return d / name


def heldout(d: Path) -> Path:
    x, y = labelled(torch.Generator().manual_seed(1), 32)
    torch.save({"x": x, "y": y}, d / "heldout.pt")
    return d / "heldout.pt"


CliCase = Callable[[Path], tuple[list[str], list[str]]]  # folder -> (argv, what the last line must name)
M = ["--model", MODEL_SPEC]


def _truncated(d: Path) -> Path:
    ck = checkpoint(d)
    state = ck / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return ck


def _no_state(d: Path) -> Path:
    ck = checkpoint(d)
    (ck / "state.pt").unlink()
    return ck


def _bad_json(d: Path) -> Path:
    ck = checkpoint(d)
    (ck / "config.json").write_text("{not json")
    return ck


def _a_file(d: Path) -> Path:
    (d / "file.txt").write_text("keep me")
    return d / "file.txt"


def _garbage(d: Path) -> Path:
    (d / "garbage.pt").write_bytes(os.urandom(300))
    return d / "garbage.pt"


def _cases(full: bool) -> list[tuple[str, CliCase, bool]]:
    """``(name, build, in a subprocess too)``; ``full`` adds the cases that run seconds today."""
    def damaged(cmd: str, make: Callable[[Path], Path], what: str) -> CliCase:
        def build(d: Path) -> tuple[list[str], list[str]]:
            ck = make(d)
            extra = {"export": ["--out", str(d / "exp")], "watch": ["--polls", "1", "--poll-s", "0.01"],
                     "audit": ["--heldout", str(heldout(d))]}[cmd]
            return [cmd, str(ck), *M, *extra], [str(ck), what]
        return build

    cases: list[tuple[str, CliCase, bool]] = []
    for cmd in ("export", "watch", "audit"):
        cases.append((f"{cmd}: truncated state.pt", damaged(cmd, _truncated, "state.pt"), cmd == "export"))
        cases.append((f"{cmd}: missing state.pt", damaged(cmd, _no_state, "state.pt"), cmd == "watch"))
    cases += [
        ("export: config.json not JSON", damaged("export", _bad_json, "config.json"), False),
        ("watch: config.json not JSON", damaged("watch", _bad_json, "config.json"), False),
        ("audit: --heldout garbage", lambda d: (["audit", str(checkpoint(d)), *M, "--heldout", str(_garbage(d))],
                                                [str(d / "garbage.pt")]), False),
        ("audit: --json under a file", lambda d: (["audit", str(checkpoint(d)), *M, "--heldout", str(heldout(d)),
                                                   "--json", str(_a_file(d) / "out.json")], [str(d / "file.txt")]),
         False),
        ("audit: --store-key-file missing", lambda d: (["audit", str(checkpoint(d)), *M, "--heldout",
                                                        str(heldout(d)), "--store-key-file", str(d / "no.key")],
                                                       [str(d / "no.key")]), False),
        ("export: --out under a file", lambda d: (["export", str(checkpoint(d)), *M, "--out",
                                                   str(_a_file(d) / "exp")], [str(d / "file.txt")]), False),
        ("export: --model unknown", lambda d: (["export", str(checkpoint(d)), "--out", str(d / "exp"), "--model",
                                                "no_such_module:f"], ["no_such_module"]), False),
        ("simulate: --out is a file", lambda d: (["simulate", "--profile", "galaxy-s24", "--days", "1", "--out",
                                                  str(_a_file(d))], [str(d / "file.txt")]), False),
        ("demo: unknown --profile, --days 0", lambda d: (["demo", "--profile", "nonexistent", "--tasks", "1",
                                                          "--train-per-task", "64", "--test-per-task", "32",
                                                          "--days", "0", "--out", str(d / "demo.png")],
                                                         ["nonexistent"]), False),
        ("demo: --tasks abc", lambda d: (["demo", "--tasks", "abc"], ["abc"]), True),
        ("demo: --tasks 0", lambda d: (["demo", "--tasks", "0"], ["--tasks"]), False),
        ("demo: --days -1", lambda d: (["demo", "--days", "-1"], ["--days"]), False),
        ("export: --max-batch 1", lambda d: (["export", str(d), "--out", str(d / "o"), "--max-batch", "1"],
                                             ["--max-batch"]), False),
        ("profile: --runs 0", lambda d: (["profile", str(d / "infer.pte"), "--runs", "0"], ["--runs"]), False),
        ("simulate: --days x", lambda d: (["simulate", "--profile", "galaxy-s24", "--days", "x"], ["'x'"]), False),
        ("simulate: --policy bogus", lambda d: (["simulate", "--profile", "galaxy-s24", "--policy", "bogus"],
                                                ["bogus"]), False),
        ("watch: --poll-s abc", lambda d: (["watch", str(d), "--poll-s", "abc"], ["abc"]), False),
        ("watch: --poll-s 0", lambda d: (["watch", str(checkpoint(d)), *M, "--poll-s", "0"],
                                         ["poll_s", "--poll-s"]), False),
    ]
    if full:  # these run the whole export or demo today before (or instead of) failing
        cases += [
            ("export: --out an existing file", lambda d: (["export", str(checkpoint(d)), *M, "--no-int8",
                                                           "--no-onnx", "--out", str(_a_file(d))],
                                                          [str(d / "file.txt")]), False),
            ("demo: unknown --profile, --days 1", lambda d: (["demo", "--profile", "nonexistent", "--tasks", "1",
                                                              "--train-per-task", "64", "--test-per-task", "32",
                                                              "--days", "1", "--out", str(d / "demo.png")],
                                                             ["nonexistent"]), False),
        ]
    runs = [(name, build, False) for name, build, _ in cases]
    runs += [(f"{name} (python -m)", build, True) for name, build, sub in cases if sub and full]
    return runs


def classify_cli(name: str, code: int, stderr: str, names: list[str]) -> Outcome:
    last = next((x for x in reversed(stderr.strip().splitlines()) if x.strip()), "")
    if "Traceback" in stderr:
        return raw(f"{name}: traceback, {short(last, 110)}")
    if code == 0:
        return silent(f"{name}: exit 0, accepted")
    if code != 2:
        return raw(f"{name}: exit {code}, {short(last, 110)}")
    if not any(n in last for n in names):
        return raw(f"{name}: exit 2 but the last line names neither path nor value: {short(last, 90)}")
    return clean()


def try_cli_bad_args(d: Path, rng: random.Random, i: int, *, full: bool = True) -> Outcome:
    name, build, in_subprocess = _cases(full)[i]
    argv, names = build(d)
    code, stderr = cli_subprocess(argv, d) if in_subprocess else cli_in_process(argv)
    return classify_cli(name, code, stderr, names)


# ----------------------------------------------------------------- sizes
SIZE_CONFIGS = {  # name: (input features, stream tag, encrypted)
    "plain": (DIM, "task-1", False),
    "long tags, 16 floats": (16, "stream-" + "x" * 193, False),
    "encrypted": (DIM, "task-1", True),
}


SIZE_BATCH = 32  # records per append: a learn() batch


@functools.lru_cache(maxsize=None)
def size_run(config: str, seed: int, batch: int = SIZE_BATCH) -> tuple[float, float, list[str]]:
    """``(largest open size, closed size, warnings)``, sizes over ``capacity_mb * 1e6``: a 1 MB store
    offered three times the records it holds, ``batch`` at a time, its files (database, WAL,
    shared-memory index, witness, lock) measured after each append."""
    dim, tag, encrypted = SIZE_CONFIGS[config]
    budget = 1e6
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        store = ReplayStore(d / "r.db", StoreConfig(capacity_mb=budget / 1e6), seed=seed,
                            key=os.urandom(32) if encrypted else None)
        g = torch.Generator().manual_seed(seed)
        largest, offered = 0, 0
        try:
            with recorded() as said:
                while offered < 3 * (store.capacity_records or batch):
                    store.append(*records(g, batch, dim), stream=tag)
                    offered += batch
                    largest = max(largest, dir_bytes(d, "r.db"))
        finally:
            store.close()
        return largest / budget, dir_bytes(d, "r.db") / budget, list(said)


def size_outcome(config: str, ratio: float, when: str) -> Outcome:
    if ratio > 1.1:
        return silent(f"{config}: {ratio:.2f}x capacity_mb {when}", ratio)
    return clean(value=ratio)


def try_size_open(d: Path, rng: random.Random, i: int) -> Outcome:
    config = list(SIZE_CONFIGS)[i % len(SIZE_CONFIGS)]
    return size_outcome(config, size_run(config, i // len(SIZE_CONFIGS))[0], "while open")


def try_size_closed(d: Path, rng: random.Random, i: int) -> Outcome:
    config = list(SIZE_CONFIGS)[i % len(SIZE_CONFIGS)]
    return size_outcome(config, size_run(config, i // len(SIZE_CONFIGS))[1], "after close")


def try_size_large_append(d: Path, rng: random.Random, i: int) -> Outcome:
    """Appends of 256 records into a 1 MB store: an append is one transaction, so once the store
    is full the log holds every page it rewrote; within 1.1x, or the store said so."""
    config = list(SIZE_CONFIGS)[i % len(SIZE_CONFIGS)]
    ratio, _, said = size_run(config, i // len(SIZE_CONFIGS), 256)
    if ratio <= 1.1:
        return clean(value=ratio)
    if any("write-ahead log holds" in w for w in said):
        return clean(f"{config}: {ratio:.2f}x capacity_mb while open, and the store warned", ratio)
    return silent(f"{config}: {ratio:.2f}x capacity_mb while open, no warning", ratio)


# ------------------------------------------------------- runtime faults
def try_large_input_night(d: Path, rng: random.Random, i: int) -> Outcome:
    torch.manual_seed(i)
    model = nn.Sequential(nn.Linear(DIM, 100), nn.ReLU(), nn.Linear(100, CLASSES))
    wake = WakeConfig(train="adapters") if i % 2 == 0 else WakeConfig(train="all")
    train = wake.train
    es = EdgeSleep(model, store=d / "r.db", wake=wake, seed=i)
    g = torch.Generator().manual_seed(i)
    try:
        with recorded() as at_learn:
            for _ in range(8):
                x = torch.randint(0, 256, (32, DIM), generator=g).float()  # raw pixels, not scaled to [0, 1]
                es.learn(x, torch.randint(0, CLASSES, (32,), generator=g))
        with recorded() as at_night:
            report = es.sleep()
    except Exception as e:
        return from_error(e, f"train={train}")
    finally:
        es.store.close()
    if report.completed:
        return clean()
    if at_learn:
        return clean(f"train={train}: learn warned: {short(at_learn[0], 80)}")
    said = "warned at night only" if at_night else "no warning"
    return silent(f"train={train}: the night aborted ({short(report.aborted or 'not completed', 60)}), {said}")


class FailingDB:
    """A stand-in for the store's SQLite connection whose next transaction fails (a full disk)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("BEGIN"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@contextlib.contextmanager
def failing_write(store: ReplayStore, how: str) -> Iterator[None]:
    """Make the store's next write fail: its connection refuses the transaction (``db``), or its
    ``offer`` draws from the store's generator and raises ``StoreError`` (``offer``)."""
    if how == "db" and hasattr(store, "_db"):
        real = store._db
        store._db = FailingDB(real)  # type: ignore[assignment]
        try:
            yield
        finally:
            store._db = real
        return

    def offer(*args: Any, **kwargs: Any) -> Any:
        store.rng.integers(0, 1 << 30, size=len(args[0]))  # the eviction's draws, then the write fails
        raise StoreError("injected: the write failed")

    store.offer = offer  # type: ignore[method-assign]
    try:
        yield
    finally:
        del store.offer


def try_learn_failure_rng(d: Path, rng: random.Random, i: int) -> Outcome:
    how = "db" if i % 2 == 0 else "offer"
    steps, fail_at = 6, rng.randint(1, 5)  # a failure once the store holds records: replay was drawn

    def run(folder: Path, fail: bool) -> tuple[EdgeSleep, list[Outcome]]:
        torch.manual_seed(i)
        es = EdgeSleep(small_mlp(), store=folder / "r.db", store_config=StoreConfig(capacity_records=40),
                       wake=WakeConfig(train="all", replay_batch=8), seed=i)
        g = torch.Generator().manual_seed(i)
        seen: list[Outcome] = []
        for step in range(steps):
            x, y = labelled(g)
            if fail and step == fail_at:
                try:
                    with failing_write(es.store, how):
                        es.learn(x, y)
                    seen.append(raw(f"{how}: the injected failure did not reach learn()"))
                except Exception as e:
                    seen.append(from_error(e, f"{how}: learn with a failing write"))
            es.learn(x, y)  # the retry
        return es, seen

    (d / "a").mkdir()
    (d / "b").mkdir()
    ref, _ = run(d / "a", False)
    es, checks = run(d / "b", True)
    try:
        if es.store.rng.bit_generator.state != ref.store.rng.bit_generator.state:
            checks.append(silent(f"{how}: after a failed write and its retry the store's generator differs "
                                 "from a clean run's"))
        if snapshot(es.store) != snapshot(ref.store) or es.store.seen != ref.store.seen:
            checks.append(silent(f"{how}: the store differs from a clean run's after the retry"))
        weights = zip(es.model.state_dict().values(), ref.model.state_dict().values())
        if not all(torch.equal(a, b) for a, b in weights):
            checks.append(silent(f"{how}: the weights differ from a clean run's after the retry"))
    finally:
        es.store.close()
        ref.store.close()
    return worst(checks)


def try_closed_store_props(d: Path, rng: random.Random, i: int) -> Outcome:
    kind = ("empty", "with records", "encrypted", "in memory", "taken over")[i % 5]
    key = os.urandom(32) if kind == "encrypted" else None
    path: str | Path = ":memory:" if kind == "in memory" else d / "r.db"
    store = ReplayStore(path, StoreConfig(capacity_records=100), seed=0, key=key)
    if kind != "empty":
        store.append(*records(torch.Generator().manual_seed(i), 20))
    other = None
    if kind == "taken over":
        other = ReplayStore(path, StoreConfig(capacity_records=100), seed=0)  # closes `store`, saying why
    else:
        store.close()
    checks: list[Outcome] = []
    for prop, read in (("len()", len), ("capacity_records", lambda s: s.capacity_records),
                       ("seen", lambda s: s.seen), ("bytes_used()", lambda s: s.bytes_used())):
        try:
            read(store)
            checks.append(clean())
        except Exception as e:
            checks.append(from_error(e, f"{kind}: {prop} of a closed store"))
    if other is not None:
        other.close()
    return worst(checks)


# ---------------------------------------------------------------- runner
Try = Callable[[Path, random.Random, int], Outcome]
# name: (one try, tries in the full campaign, tries with --quick)
SCENARIOS: dict[str, tuple[Try, int, int]] = {
    "kill_during_learn": (try_kill_during_learn, 100, 5),
    "kill_during_save": (try_kill_during_save, 100, 5),
    "kill_during_sleep": (try_kill_during_sleep, 50, 3),
    "bitflip_db": (try_bitflip_db, 400, 10),  # cheap, and a flip that does harm is rare: more tries
    "bitflip_db_encrypted": (try_bitflip_db_encrypted, 400, 10),
    "bitflip_meta": (try_bitflip_meta, 200, 10),
    "bitflip_meta_encrypted": (try_bitflip_meta_encrypted, 200, 10),
    "bitflip_wal": (try_bitflip_wal, 100, 4),
    "bitflip_wal_encrypted": (try_bitflip_wal_encrypted, 100, 4),
    "aliased_path": (try_aliased_path, 30, 3),
    "threads_open": (try_threads_open, 40, 8),
    "threads_learn_save": (try_threads_learn_save, 40, 2),
    "cli_bad_args": (try_cli_bad_args, 0, 0),  # one try per case: len(_cases(full))
    "size_open": (try_size_open, 6, 3),
    "size_closed": (try_size_closed, 6, 3),
    "size_large_append": (try_size_large_append, 3, 3),
    "large_input_night": (try_large_input_night, 10, 2),
    "learn_failure_rng": (try_learn_failure_rng, 20, 4),
    "closed_store_props": (try_closed_store_props, 10, 5),
}


# run each try in a child process: races between threads in one process, which can crash it
ISOLATED = {"threads_open", "threads_learn_save"}


def run_scenario(name: str, quick: bool, seed: int) -> list[Outcome]:
    """Every try of scenario ``name``, each in its own temporary folder; an exception that escapes a
    try (from the code under test, at a step the try did not expect to fail) is raw."""
    one, full_tries, quick_tries = SCENARIOS[name]
    if name == "cli_bad_args":
        one = functools.partial(try_cli_bad_args, full=not quick)
        full_tries = quick_tries = len(_cases(not quick))
    rng = random.Random(f"{seed}:{name}")
    outcomes = []
    for i in range(quick_tries if quick else full_tries):
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as tmp:
            try:
                if name in ISOLATED:
                    outcomes.append(isolated(name, Path(tmp), rng.randrange(2**32), i))
                else:
                    outcomes.append(one(Path(tmp), rng, i))
            except Exception as e:
                outcomes.append(raw(f"uncaught: {short(e)}"))
    return outcomes


def _note_key(note: str) -> str:
    return re.sub(r"/\S*faults-\S*|\d+", "#", note)


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts per class, up to 5 distinct notes of the raw and silent tries, and ``max_ratio``."""
    row: dict[str, Any] = {"tries": len(outcomes)}
    for kind in ("clean", "raw", "silent"):
        row[kind] = sum(1 for o in outcomes if o.kind == kind)
    notes: dict[str, str] = {}
    for o in outcomes:
        if o.kind != "clean" and o.note and len(notes) < 5:
            notes.setdefault(_note_key(o.note), re.sub(r"/\S*faults-[^/\s]*", "<tmp>", o.note))
    row["notes"] = list(notes.values())
    values = [o.value for o in outcomes if o.value is not None]
    if values:
        row["max_ratio"] = round(max(values), 3)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few tries per scenario (under a minute)")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only these scenarios (of {', '.join(SCENARIOS)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every try's random choices")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON to write (default {RESULTS})")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    scenarios: dict[str, Any] = {}
    for name in args.only or list(SCENARIOS):
        t = time.perf_counter()
        row = summarize(run_scenario(name, args.quick, args.seed))
        scenarios[name] = row
        extra = f" max_ratio={row['max_ratio']:.2f}" if "max_ratio" in row else ""
        print(f"{name:24s} tries={row['tries']:3d} clean={row['clean']:3d} raw={row['raw']:3d} "
              f"silent={row['silent']:3d}{extra}  ({time.perf_counter() - t:.1f} s)", flush=True)
        for note in row["notes"]:
            print(f"    {note}", flush=True)
    prov = provenance(ROOT)
    # the edge_sleep under test: this checkout's, or another on PYTHONPATH (an earlier commit, say)
    library = provenance(Path(edge_sleep.__file__).resolve().parents[1])
    result = {"commit": prov["commit"], "commit_dirty": prov["commit_dirty"], "library_commit": library["commit"],
              "library_dirty": library["commit_dirty"], "quick": args.quick,
              "seconds": round(time.perf_counter() - t0, 1), "scenarios": scenarios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
