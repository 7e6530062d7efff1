"""edge-sleep watch driven by fake probes and a fake clock: nothing waits."""

from __future__ import annotations

from pathlib import Path

import pytest

import torch

from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.schedule import DeviceState, IdleAndCharging
from edge_sleep.watch import watch
from tests.conftest import small_mlp

PLUGGED = DeviceState(charging=True, battery_frac=0.9, idle_s=7200.0, thermal="nominal", screen_on=False)
UNPLUGGED = DeviceState(charging=False, battery_frac=0.9, idle_s=7200.0, thermal="nominal", screen_on=False)


def saved_runtime(tmp_path: Path, wake_steps: int = 8) -> Path:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", store_config=StoreConfig(capacity_records=128),
                   wake=WakeConfig(train="all", lr=0.1, replay_batch=0),
                   sleep=SleepConfig(min_steps=10, check_every=5, fisher_steps=4, batch_size=16))
    g = torch.Generator().manual_seed(0)
    for _ in range(wake_steps):
        x = torch.randn(16, 8, generator=g)
        es.learn(x, (x[:, 0] > 0).long())
    ckpt = es.save(tmp_path / "ckpt")
    es.store.close()
    return ckpt


def test_watch_waits_then_sleeps_and_saves(tmp_path: Path) -> None:
    ckpt = saved_runtime(tmp_path)
    states = iter([UNPLUGGED] + [PLUGGED] * 100)
    waits: list[float] = []
    lines: list[str] = []
    history = watch(ckpt, small_mlp, policy=IdleAndCharging(min_steps=10), probe=lambda: next(states),
                    clock=lambda: 0.0, wait=waits.append, poll_s=30.0, max_polls=3, log=lines.append)
    assert [h["sleep"] for h in history] == [False, True, False]
    assert history[0]["reason"] == "not charging (requires external power)"
    assert history[1]["completed"] and history[1]["steps"] == 10
    assert history[2]["reason"].startswith("nothing to consolidate")
    assert waits == [30.0, 30.0]  # no wait after the last poll
    assert any("night  10 steps, completed" in line for line in lines)
    es = EdgeSleep.load(ckpt, small_mlp())  # the night is in the checkpoint
    assert es.wake_steps_since_sleep == 0 and es.sleep_state is None
    es.store.close()


def test_watch_wakes_on_unplug_and_resumes_next_window(tmp_path: Path) -> None:
    ckpt = saved_runtime(tmp_path, wake_steps=40)
    # poll 1: plugged; the night asks the probe between chunks and is unplugged after a few
    states = iter([PLUGGED, PLUGGED, PLUGGED, UNPLUGGED, UNPLUGGED] + [PLUGGED] * 100)
    history = watch(ckpt, small_mlp, policy=IdleAndCharging(min_steps=10), probe=lambda: next(states),
                    wait=lambda s: None, max_polls=3, log=lambda line: None)
    assert history[0]["sleep"] and not history[0]["completed"]
    assert 0 < history[0]["steps"] < 40 and history[0]["steps"] % 5 == 0  # woken between chunks of 5
    assert not history[1]["sleep"]
    assert history[2]["sleep"] and history[2]["reason"] == "resume the preempted night" and history[2]["completed"]
    assert history[0]["steps"] + history[2]["steps"] == 40


def test_watch_retries_when_another_process_holds_the_store(tmp_path: Path) -> None:
    ckpt = saved_runtime(tmp_path)
    holder = EdgeSleep.load(ckpt, small_mlp())  # the app has the store open in this process...
    import subprocess
    import sys
    import textwrap

    # ...and the watcher runs in another process, so the lock says busy there
    code = textwrap.dedent(f"""
        from edge_sleep.schedule import DeviceState
        from edge_sleep.watch import watch
        from tests.conftest import small_mlp
        s = DeviceState(charging=True, idle_s=9999.0, screen_on=False)
        h = watch({str(ckpt)!r}, small_mlp, probe=lambda: s, wait=lambda t: None, max_polls=1, log=print)
        assert h[0]["reason"].startswith("store busy"), h
    """)
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    holder.store.close()
    assert run.returncode == 0, run.stderr
    assert "store busy" in run.stdout


def test_watch_sleeps_a_board_on_mains_with_no_battery(tmp_path: Path) -> None:
    """Issue 24: on a fake sysfs tree with no power supply, --mains lets the night run."""
    from edge_sleep.schedule import LinuxProbe

    ckpt = saved_runtime(tmp_path)
    sys_root = tmp_path / "sys"
    (sys_root / "class").mkdir(parents=True)
    bare = LinuxProbe(sys_root=sys_root, dev_root=tmp_path, use_psutil=False, cpu_load=None)
    history = watch(ckpt, small_mlp, policy=IdleAndCharging(min_steps=10), probe=bare, wait=lambda s: None,
                    max_polls=1, log=lambda line: None)
    assert history[0]["reason"] == "charging state unknown (requires external power)"
    board = LinuxProbe(sys_root=sys_root, dev_root=tmp_path, use_psutil=False, cpu_load=None, mains=True)
    history = watch(ckpt, small_mlp, policy=IdleAndCharging(min_steps=10), probe=board, wait=lambda s: None,
                    max_polls=1, log=lambda line: None)
    assert history[0]["sleep"] and history[0]["completed"]


def test_a_refusing_device_never_opens_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = saved_runtime(tmp_path)
    opened: list[Path] = []
    real = EdgeSleep.load

    def counting(*args: object, **kwargs: object) -> EdgeSleep:
        opened.append(Path(str(args[0])))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(EdgeSleep, "load", counting)
    states = iter([UNPLUGGED, UNPLUGGED] + [PLUGGED] * 100)
    history = watch(ckpt, small_mlp, policy=IdleAndCharging(min_steps=10), probe=lambda: next(states),
                    wait=lambda s: None, max_polls=3, log=lambda line: None)
    assert [h["sleep"] for h in history] == [False, False, True]
    # the start's check, then only the poll the device allowed read the checkpoint and locked the store
    assert len(opened) == 2


def test_the_probe_set_survives_a_restarted_watcher(tmp_path: Path) -> None:
    from edge_sleep.schedule import AdaptivePolicy
    from edge_sleep.watch import probe_set_path

    ckpt = saved_runtime(tmp_path, wake_steps=30)
    policy = AdaptivePolicy(device=IdleAndCharging(min_steps=10), min_wake_steps=0)
    watch(ckpt, small_mlp, policy=policy, probe=lambda: PLUGGED, wait=lambda s: None, max_polls=1,
          log=lambda line: None)
    saved = torch.load(probe_set_path(ckpt), weights_only=False)
    assert saved["baseline"] is not None and len(saved["slots"]) > 0
    # the app learns more, then the watcher restarts: it measures the drop against the saved baseline
    es = EdgeSleep.load(ckpt, small_mlp())
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        x = torch.randn(16, 8, generator=g)
        es.learn(x, (x[:, 1] > 0).long())  # another rule: the probe records' accuracy moves
    es.save(ckpt)
    es.store.close()
    lines: list[str] = []
    watch(ckpt, small_mlp, policy=policy, probe=lambda: PLUGGED, wait=lambda s: None, max_polls=1, log=lines.append)
    assert "probe drop unknown" not in lines[0] and "probe drop" in lines[0]
    again = torch.load(probe_set_path(ckpt), weights_only=False)
    assert again["baseline"] is not None
