"""``edge-sleep watch CHECKPOINT_DIR``: sleep a saved runtime when the device allows, on a Linux device.

Every ``poll_s`` seconds the watcher reads the device's state (:class:`~edge_sleep.schedule.LinuxProbe`
by default) and logs the decision. While the device refuses (unplugged, in use, busy, hot) that is
all it does: the checkpoint is not read and the store not locked (it is read once at the start, so a
damaged checkpoint is reported at once). When it allows, the watcher
opens the checkpoint (and its store) and asks the policy. When
the policy says sleep, it runs the night, asking the probe again between chunks of steps and
waking up the moment the device stops allowing it (unplugged, screen on, too hot); then it saves
the checkpoint atomically (a preempted night's progress included, so the next window resumes it)
and closes the store, so the app can write to it between nights. A store another process holds
is logged and tried again at the next poll.

The adaptive policy's probe set (which stored records it measures forgetting on, and their accuracy
after the last night) is kept beside the checkpoint in ``<checkpoint>.probe.pt``, so a restarted
watcher still sees the drop since that night.

The probe, the clock and the wait are parameters: tests drive the loop with fakes, and nothing
waits.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sleep.errors import StoreBusyError
from edge_sleep.schedule import (
    DeviceState,
    IdleAndCharging,
    ProbeSet,
    SleepPolicy,
    SleepPressure,
    device_conditions,
)

__all__ = ["watch", "probe_set_path"]


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def probe_set_path(checkpoint: Path | str) -> Path:
    """Where the watcher keeps its probe set: beside the checkpoint (a save replaces the folder)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".probe.pt")


def _load_probe_set(checkpoint: Path, log: Callable[[str], None]) -> ProbeSet | None:
    path = probe_set_path(checkpoint)
    if not path.exists():
        return None
    probe_set = ProbeSet()
    try:
        probe_set.load_state_dict(torch.load(path, weights_only=False))
    except Exception as e:  # a damaged file costs the drop since the last night, not the watcher
        log(f"probe set {path} unreadable ({type(e).__name__}: {e}); drawing a new one")
        return None
    return probe_set


def _save_probe_set(checkpoint: Path, probe_set: ProbeSet) -> None:
    path = probe_set_path(checkpoint)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        torch.save(probe_set.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def watch(
    checkpoint: Path | str,
    model_factory: Callable[[], nn.Module],
    *,
    policy: SleepPolicy | None = None,
    probe: Callable[[], DeviceState] | None = None,
    clock: Callable[[], float] = time.time,
    wait: Callable[[float], None] = time.sleep,
    poll_s: float = 60.0,
    max_polls: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Poll, decide, sleep; forever or for ``max_polls`` polls.

    Args:
        checkpoint: a folder :meth:`EdgeSleep.save` wrote; rewritten after each night window.
        model_factory: builds a fresh model of the checkpoint's architecture.
        policy: default :class:`~edge_sleep.schedule.IdleAndCharging` ().
        probe: returns the device's state; default :class:`~edge_sleep.schedule.LinuxProbe` ().
        clock: wall-clock seconds, for the log.
        wait: called with ``poll_s`` between polls.
        poll_s: seconds between polls.
        max_polls: stop after this many polls (``None``: run until interrupted).
        log: receives one line per decision and per night.

    Returns:
        One dict per poll: ``time``, ``state``, ``sleep``, ``reason`` and, after a night,
        ``steps``, ``completed``.
    """
    from edge_sleep.runtime import EdgeSleep
    from edge_sleep.schedule import LinuxProbe

    if poll_s <= 0:
        from edge_sleep.errors import ConfigError

        raise ConfigError("watch", [f"poll_s={poll_s}; expected > 0 seconds"])
    policy = policy or IdleAndCharging()
    probe = probe or LinuxProbe()
    device = device_conditions(policy)
    probe_set: ProbeSet | None = None
    history: list[dict[str, Any]] = []
    polls = 0
    checkpoint = Path(checkpoint)
    try:  # a damaged checkpoint or a wrong model is said now, not at the first night hours later
        EdgeSleep.load(checkpoint, model_factory()).store.close()
    except StoreBusyError:
        pass  # the app has the store now: the polls retry
    while max_polls is None or polls < max_polls:
        polls += 1
        state = probe()
        entry: dict[str, Any] = {"time": clock(), "state": state.describe()}
        refused = None if device is None else device.device_allows(state)
        if refused is not None:  # decided before the checkpoint is read or the store locked
            entry.update(sleep=False, reason=refused)
            log(f"{_stamp(entry['time'])}  wait   {refused}  [{entry['state']}]")
            history.append(entry)
            if max_polls is None or polls < max_polls:
                wait(poll_s)
            continue
        try:
            es = EdgeSleep.load(checkpoint, model_factory())
        except StoreBusyError as exc:
            entry.update(sleep=False, reason=f"store busy ({exc}); retry at the next poll")
            log(f"{_stamp(entry['time'])}  wait   {entry['reason']}  [{entry['state']}]")
            history.append(entry)
            if max_polls is None or polls < max_polls:
                wait(poll_s)
            continue
        try:
            if probe_set is None:
                probe_set = _load_probe_set(checkpoint, log)
            if probe_set is None:
                probe_set = ProbeSet()
                if len(es.store):
                    probe_set.refresh(es)
                    _save_probe_set(checkpoint, probe_set)
            pressure = SleepPressure(wake_steps=es.wake_steps_since_sleep,
                                     accuracy_drop=probe_set.drop(es) if len(es.store) else None,
                                     pending_night=es.sleep_state is not None)
            decision = policy.decide(state, pressure)
            entry.update(sleep=decision.sleep, reason=decision.reason)
            log(f"{_stamp(entry['time'])}  {'SLEEP' if decision.sleep else 'wait '}  {decision.reason}  "
                f"[{entry['state']}]")
            if decision.sleep:
                def should_stop() -> bool:
                    return device is not None and device.device_allows(probe()) is not None

                report = es.sleep(steps=decision.steps, should_stop=should_stop)
                es.save(checkpoint)
                entry.update(steps=report.steps, completed=report.completed)
                log(f"{_stamp(clock())}  night  {report.steps} steps, "
                    f"{'completed' if report.completed else 'preempted (resumes next window)'}"
                    f"{'' if report.aborted is None else ', aborted: ' + report.aborted}; checkpoint saved")
                if report.completed:
                    probe_set.refresh(es)
                    _save_probe_set(checkpoint, probe_set)
        finally:
            es.store.close()
        history.append(entry)
        if max_polls is None or polls < max_polls:
            wait(poll_s)
    return history
