"""Checkpoint folders: a file in the way, killed saves, concurrent saves, a full disk, damaged files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep, EdgeSleepError
from edge_sleep.atomic import atomic_directory, lock_of, previous_of, temp_folders_of
from edge_sleep.errors import CheckpointError
from tests.conftest import small_mlp

ROOT = Path(__file__).resolve().parents[1]

# a child that imports edge_sleep.atomic without the package's __init__ (and so without torch): fast to start
LIGHT_IMPORT = textwrap.dedent("""
    import sys, types
    pkg = types.ModuleType("edge_sleep")
    pkg.__path__ = [sys.argv[1] + "/edge_sleep"]
    sys.modules["edge_sleep"] = pkg
    from edge_sleep.atomic import atomic_directory
""")


def digest(es: EdgeSleep) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in es.model.parameters())).hexdigest()[:16]


def runtime(seed: int = 0) -> EdgeSleep:
    torch.manual_seed(seed)
    return EdgeSleep(small_mlp())


def siblings(folder: Path, name: str) -> list[str]:
    """What a write to ``folder / name`` may leave beside it: ``.<name>.old``, ``.tmp-...``, ``.lock``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------- a file where the folder goes
def test_save_refuses_a_file_at_the_target_before_writing_anything(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.write_text("my notes")
    es = runtime()
    with pytest.raises(CheckpointError, match=r"ckpt'.* is a file, not a folder.*Fix: remove or rename") as e:
        es.save(target)
    assert isinstance(e.value, EdgeSleepError) and isinstance(e.value, OSError)
    assert target.read_text() == "my notes"  # the file is untouched, nothing written beside it
    assert siblings(tmp_path, "ckpt") == []
    # the next saves work once the file is gone (they raised NotADirectoryError for ever before)
    target.unlink()
    es.save(target)
    es.save(target)
    assert digest(EdgeSleep.load(target, small_mlp())) == digest(es)
    assert siblings(tmp_path, "ckpt") == []


def test_atomic_directory_refuses_a_file_or_a_dangling_link_before_the_body_runs(tmp_path: Path) -> None:
    ran = []
    (tmp_path / "out").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for name in ("out", "link"):
        with pytest.raises(CheckpointError, match=name):
            with atomic_directory(tmp_path / name):
                ran.append(name)
    assert ran == [] and (tmp_path / "out").read_bytes() == b"x" and (tmp_path / "link").is_symlink()


def test_a_file_left_at_old_does_not_break_later_saves(tmp_path: Path) -> None:
    """What the earlier version left after saving over a file: ``.ckpt.old`` is a file."""
    previous_of(tmp_path / "ckpt").write_text("the file a save moved aside")
    es = runtime()
    es.save(tmp_path / "ckpt")
    es.save(tmp_path / "ckpt")
    assert digest(EdgeSleep.load(tmp_path / "ckpt", small_mlp())) == digest(es)
    assert siblings(tmp_path, "ckpt") == []


def test_atomic_directory_refuses_an_unwritable_parent_with_the_fix(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.write_text("a file where the parent folder goes")
    with pytest.raises(CheckpointError, match=r"cannot write the folder .*parent/out.*Fix"):
        with atomic_directory(parent / "out"):
            raise AssertionError("the body ran")


# ----------------------------------------------------------------- temporary folders of killed writes
def test_stale_temp_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        zombie.kill()  # killed, not reaped: os.kill(pid, 0) still finds it
        deadline = time.monotonic() + 10
        while Path("/proc/self/stat").exists() and " Z " not in Path(f"/proc/{zombie.pid}/stat").read_text():
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        made = {
            "dead": tmp_path / f".ckpt.tmp-{dead}-abcd1234",
            "zombie": tmp_path / f".ckpt.tmp-{zombie.pid}-abcd1234",
            "live": tmp_path / f".ckpt.tmp-{live.pid}-abcd1234",
            "own": tmp_path / f".ckpt.tmp-{os.getpid()}-abcd1234",  # another thread of this process
            "other target": tmp_path / f".other.tmp-{dead}-abcd1234",
            "not ours": tmp_path / f".ckpt.tmp-{dead}-abcd1234.keep",
        }
        for folder in made.values():
            folder.mkdir()
            (folder / "state.pt").write_bytes(b"half")
        assert set(temp_folders_of(target)) == {made["dead"], made["zombie"], made["live"], made["own"]}
        runtime().save(target)
        assert not made["dead"].exists()
        assert made["zombie"].exists() != Path("/proc/self/stat").exists()  # told from /proc where there is one
        assert all(made[k].is_dir() for k in ("live", "own", "other target", "not ours"))
    finally:
        for proc in (live, zombie):
            proc.kill()
            proc.wait()


def test_a_write_killed_with_sigkill_leaves_a_folder_the_next_write_removes(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    child = LIGHT_IMPORT + textwrap.dedent("""
        import time
        with atomic_directory(sys.argv[2]) as tmp:
            (tmp / "state.pt").write_bytes(b"half written")
            print(tmp, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, str(ROOT), str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir() and left.name.startswith(f".ckpt.tmp-{proc.pid}-")
    es = runtime()
    es.save(target)
    assert not left.exists() and siblings(tmp_path, "ckpt") == []
    assert digest(EdgeSleep.load(target, small_mlp())) == digest(es)


# ----------------------------------------------------------------- concurrent saves
def test_eight_runtimes_saving_to_one_folder_from_threads_all_succeed(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    runtimes = [runtime(seed) for seed in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(runtimes))

    def save(es: EdgeSleep) -> None:
        try:
            start.wait()
            for _ in range(5):
                es.save(target)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(es,)) for es in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert digest(EdgeSleep.load(target, small_mlp())) in {digest(es) for es in runtimes}
    assert siblings(tmp_path, "ckpt") == []


def test_eight_processes_writing_one_folder_all_succeed_and_the_last_wins(tmp_path: Path) -> None:
    target, go = tmp_path / "out", tmp_path / "go"
    child = LIGHT_IMPORT + textwrap.dedent("""
        import os, time
        from pathlib import Path
        target, go, me = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
        while not go.exists():
            time.sleep(0.001)
        for i in range(30):
            with atomic_directory(target) as tmp:
                (tmp / "who").write_text(f"{me} {i}")
        print("done", flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(ROOT), str(target), str(go), str(k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(8)]
    time.sleep(0.3)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [(p.returncode, err) for p, (_, err) in zip(procs, results)] == [(0, "")] * 8
    assert all(out.strip() == "done" for out, _ in results)
    who, i = (target / "who").read_text().split()
    assert who in {str(k) for k in range(8)} and i == "29"  # complete: some writer's last write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out"]
    assert not lock_of(target).exists()


@pytest.mark.slow
def test_eight_processes_saving_runtimes_to_one_folder_all_succeed(tmp_path: Path) -> None:
    target, go = tmp_path / "ckpt", tmp_path / "go"
    child = textwrap.dedent("""
        import hashlib, sys, time, torch
        from pathlib import Path
        from edge_sleep import EdgeSleep
        from tests.conftest import small_mlp
        target, go, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        torch.manual_seed(seed)
        es = EdgeSleep(small_mlp())
        print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in es.model.parameters())).hexdigest()[:16],
              flush=True)
        while not go.exists():
            time.sleep(0.001)
        for _ in range(3):
            es.save(target)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(target), str(go), str(seed)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(8)]
    digests = []
    for p in procs:
        assert p.stdout is not None
        digests.append(p.stdout.readline().strip())  # every child is ready
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [(p.returncode, err) for p, (_, err) in zip(procs, results)] == [(0, "")] * 8
    assert digest(EdgeSleep.load(target, small_mlp())) in set(digests)
    assert siblings(tmp_path, "ckpt") == []


# ----------------------------------------------------------------- a full disk
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
])
def test_a_save_on_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    target = tmp_path / "ckpt"
    first = runtime(0)
    first.save(target)
    second = runtime(1)

    def full_disk(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"PK\x03\x04 half")  # what a write cut short leaves
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        second.save(target)
    message = str(e.value)
    assert str(target) in message and "Fix: free space" in message and "writable" in message
    assert str(failure).split(":")[0].strip("[] ") in message  # the cause, on one line
    assert "\n" not in message and isinstance(e.value.__cause__, type(failure))
    monkeypatch.undo()
    assert digest(EdgeSleep.load(target, small_mlp())) == digest(first)  # the previous checkpoint, intact
    assert siblings(tmp_path, "ckpt") == []


# ----------------------------------------------------------------- damaged checkpoints
def _damage_truncate(ckpt: Path) -> None:
    raw = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(raw[: len(raw) // 2])


def _damage_garbage(ckpt: Path) -> None:
    (ckpt / "state.pt").write_bytes(b"not a torch file " * 8)


def _damage_empty(ckpt: Path) -> None:
    (ckpt / "state.pt").write_bytes(b"")


def _damage_list(ckpt: Path) -> None:
    torch.save([1, 2, 3], ckpt / "state.pt")


def _damage_state_keys(ckpt: Path) -> None:
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["anchor"], state["generator"]
    torch.save(state, ckpt / "state.pt")


def _damage_missing_state(ckpt: Path) -> None:
    (ckpt / "state.pt").unlink()


def _damage_config_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"format_version": 1, "wake": ')


def _damage_config_not_utf8(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(b"\xff\xfe\x00garbage")


def _damage_config_list(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("[1, 2]")


def _damage_config_keys(ckpt: Path) -> None:
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["store_config"], meta["seed"]
    meta["wake"] = "all"
    (ckpt / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("damage", "file", "says"), [
    (_damage_truncate, "state.pt", "truncated or damaged"),
    (_damage_garbage, "state.pt", "truncated or damaged"),
    (_damage_empty, "state.pt", "truncated or damaged"),
    (_damage_list, "state.pt", "holds a list"),
    (_damage_state_keys, "state.pt", "['anchor', 'generator']"),
    (_damage_missing_state, "state.pt", "is missing"),
    (_damage_config_not_json, "config.json", "cannot be read as JSON"),
    (_damage_config_not_utf8, "config.json", "cannot be read as JSON"),
    (_damage_config_list, "config.json", "holds a JSON list"),
    (_damage_config_keys, "config.json", "['store_config', 'seed'] and has ['wake']"),
])
def test_load_of_a_damaged_checkpoint_names_the_file_and_the_fix(
        tmp_path: Path, damage: Callable[[Path], None], file: str, says: str) -> None:
    es = runtime()
    es.learn(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    es.save(tmp_path / "ckpt")
    damage(tmp_path / "ckpt")
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError) as e:
        EdgeSleep.load(tmp_path / "ckpt", model)
    message = str(e.value)
    assert str(tmp_path / "ckpt" / file) in message and says in message
    assert "Fix: pass an intact checkpoint" in message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is untouched
