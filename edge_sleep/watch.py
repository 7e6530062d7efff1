"""``edge-sleep watch CHECKPOINT_DIR``: sleep a saved runtime when the device allows, on a Linux device.

Every ``poll_s`` seconds the watcher reads the device's state (:class:`~edge_sleep.schedule.LinuxProbe`
by default), opens the checkpoint (and its store), asks the policy, and logs the decision. When
the policy says sleep, it runs the night, asking the probe again between chunks of steps and
waking up the moment the device stops allowing it (unplugged, screen on, too hot); then it saves
the checkpoint atomically (a preempted night's progress included, so the next window resumes it)
and closes the store, so the app can write to it between nights. A store another process holds
is logged and tried again at the next poll.

The probe, the clock and the wait are parameters: tests drive the loop with fakes, and nothing
waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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

__all__ = ["watch"]


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    while max_polls is None or polls < max_polls:
        polls += 1
        state = probe()
        entry: dict[str, Any] = {"time": clock(), "state": state.describe()}
        try:
            es = EdgeSleep.load(checkpoint, model_factory())
        except StoreBusyError as exc:
            entry.update(sleep=False, reason=f"store busy ({exc}); retry at the next poll")
            log(f"{_stamp(entry['time'])}  wait   {entry['reason']}  [{entry['state']}]")
            history.append(entry)
            wait(poll_s)
            continue
        try:
            if probe_set is None:
                probe_set = ProbeSet()
                if len(es.store):
                    probe_set.refresh(es)
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
        finally:
            es.store.close()
        history.append(entry)
        if max_polls is None or polls < max_polls:
            wait(poll_s)
    return history
