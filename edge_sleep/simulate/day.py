"""The day simulator: the real wake and sleep code on a virtual clock through a profile's day.

``edge-sleep simulate --profile NAME --days N --out DIR`` (or :func:`simulate`):

1. Setup: the demo's on-device path (the P-MNIST MLP trained on task 1 as the shipped base,
   LoRA adapters by day, a 500-record store). Compute is measured in the host's CPU time and
   scaled to the device's by the reference workload measured in the same process
   (:mod:`edge_sleep.simulate.calibrate`): here for the wake steps, around each night in its child.
2. The clock ticks (5 virtual minutes). Each day follows its plan (``config.days_from``: the
   profile's typical day, a day drawn from its ``[variation]``, or a trace's day;
   :mod:`edge_sleep.simulate.days`). Day ``d`` brings task ``d + 1``: in the day's usage
   windows the app learns ``learn_steps_per_usage_hour`` batches an hour (real ``learn`` calls).
   Outside them, the policy sees a :class:`~edge_sleep.schedule.DeviceState` built from the day
   (charging, battery, idle time, screen; thermal is not modelled and stays "nominal") and
   decides. A night runs in a child process (:mod:`edge_sleep.simulate.night`) with the
   profile's threads and memory budget, for at most the rest of the window; a night the window
   cuts short is preempted and resumes in the next window.
   With ``platform=True`` the profile's ``[platform]`` rules apply
   (:class:`~edge_sleep.simulate.profiles.PlatformRules`): each window the OS may skip the night
   or start it late; a run stops at the OS's cap (and runs again later in the window); the user may
   pick the device up (the run stops and the window ends); a run may be killed without warning.
   The night then saves its checkpoint every ``checkpoint_every_s`` device seconds, so a kill loses
   at most that much; the report counts kills, interruptions and skipped nights and measures the
   work lost and the time a stop takes.
3. Energy: the profile's use / idle draw over time, plus ``power_active_w`` times the device
   seconds of compute (wake steps and nights); the battery charges at ``charge_w`` on the
   charger. Accuracy on every task seen so far is measured the morning after each night.
4. Memory: each night's own growth (``peak_memory_mb``, held to the budget by a watchdog) and its
   whole process's peak (``process_peak_mb``), both compared with the profile's budget.
5. Output: ``report.json``, ``timeline.png`` and ``decisions.log`` (each decision that changed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_sleep.errors import ConfigError
from edge_sleep.modelio import import_model_factory
from edge_sleep.schedule import (
    AdaptivePolicy,
    DeviceState,
    IdleAndCharging,
    ProbeSet,
    SleepPolicy,
    SleepPressure,
    device_conditions,
)
from edge_sleep.simulate.days import DAYS_FROM, cycle_days, draw_days, first_use_h
from edge_sleep.simulate.calibrate import DISAGREEMENT, Calibration, calibrate, disagreement
from edge_sleep.simulate.night import KILLED_EXIT, OVER_BUDGET_EXIT, NightJob
from edge_sleep.simulate.profiles import DayPlan, DeviceProfile

__all__ = ["POLICIES", "SimulationConfig", "make_policy", "simulate"]

POLICIES = ("fixed", "adaptive")
DAY_S = 86400.0


@dataclass(frozen=True)
class SimulationConfig:
    """How a simulation runs (the profile says what device it runs on).

    Attributes:
        days: simulated days (each brings one new task).
        policy: ``"fixed"`` (:class:`~edge_sleep.schedule.IdleAndCharging`, nights of 1 replay
            step per wake step) or ``"adaptive"`` (:class:`~edge_sleep.schedule.AdaptivePolicy`).
        seed: the task stream's and the model's seed.
        batch: examples per wake step.
        train_per_task / test_per_task: images per task (training stream / accuracy).
        tick_s: the virtual clock's step.
        buffer_records: the replay store's capacity.
        probe_size: stored records in the adaptive policy's probe set.
        model: ``MODULE:CALLABLE`` that builds the model (the child process imports it).
        platform: apply the profile's ``[platform]`` rules (OS cap, start delay, skipped nights,
            interruptions, kills).
        checkpoint_every_s: with ``platform``, the night saves its progress every this many
            device seconds.
        days_from: ``"typical"`` (the profile's ``[day]`` every day), ``"drawn"`` (each day drawn
            from it with the profile's ``[variation]``, :func:`~edge_sleep.simulate.days.draw_days`)
            or ``"trace"`` (the whole days of ``trace``, in order, cycled when it has fewer).
        trace: with ``days_from="trace"``, the CSV trace (:mod:`edge_sleep.simulate.trace`).
        tz: the trace's time zone (needed for unix seconds).
        threads: host threads for the wake steps and the nights (``None``: the profile's cores, at
            most this host's). Time is CPU time scaled by the workload at the same thread count, so
            this changes how long the simulation takes, not the device's times.
    """

    days: int = 3
    policy: str = "fixed"
    seed: int = 0
    batch: int = 64
    train_per_task: int = 12000
    test_per_task: int = 1000
    tick_s: float = 300.0
    buffer_records: int = 500
    probe_size: int = 256
    model: str = "edge_sleep.bench.pmnist:mlp"
    platform: bool = False
    checkpoint_every_s: float = 60.0
    days_from: str = "typical"
    trace: str | None = None
    tz: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.days_from not in DAYS_FROM:
            problems.append(f"days_from={self.days_from!r}; expected one of {DAYS_FROM}")
        elif (self.days_from == "trace") != (self.trace is not None):
            problems.append(f"days_from={self.days_from!r}, trace={self.trace!r}; expected a trace exactly when "
                            "days_from='trace'. Fix: pass both (edge-sleep simulate --trace FILE), or neither")
        if not 1.0 <= self.checkpoint_every_s <= 86400.0:
            problems.append(f"checkpoint_every_s={self.checkpoint_every_s}; expected 1..86400 device seconds")
        if not 1 <= self.days <= 60:
            problems.append(f"days={self.days}; expected 1..60")
        if self.policy not in POLICIES:
            problems.append(f"policy={self.policy!r}; expected one of {POLICIES}")
        if self.batch < 1 or self.train_per_task < self.batch or self.test_per_task < 1:
            problems.append(f"batch={self.batch}, train_per_task={self.train_per_task}, test_per_task="
                            f"{self.test_per_task}; expected 1 <= batch <= train_per_task, test_per_task >= 1")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            problems.append(f"threads={self.threads}; expected 1..1024, or None for the profile's cores")
        if not 1.0 <= self.tick_s <= 3600.0:
            problems.append(f"tick_s={self.tick_s}; expected 1..3600 seconds")
        if problems:
            raise ConfigError("SimulationConfig", problems)


def make_policy(name: str) -> SleepPolicy:
    """``"fixed"`` -> ``IdleAndCharging()`` (1:1 nights); ``"adaptive"`` -> ``AdaptivePolicy()``."""
    if name == "fixed":
        return IdleAndCharging()
    if name == "adaptive":
        return AdaptivePolicy()
    raise ConfigError("simulate", [f"policy={name!r}; expected one of {POLICIES}"])


@dataclass
class _Night:
    day: int
    start_h: float
    end_h: float
    steps: int
    completed: bool
    host_cpu_s: float
    device_s: float
    energy_j: float
    peak_mb: float | None
    process_peak_mb: float | None = None
    failure: str | None = None
    killed: bool = False
    lost_s: float = 0.0
    stop_s: float | None = None
    check_gap_s: float | None = None
    capped: bool = False
    interrupted: bool = False


@dataclass
class _Window:
    day: int
    start_h: float
    end_h: float | None = None
    work_pending: bool = False
    used: bool = False
    reasons: list[str] = field(default_factory=list)
    skip: bool = False
    start_at: float = 0.0
    interrupt_at: float | None = None
    skipped: bool = False


class _Trace:
    """What the timeline plot and the report need, recorded tick by tick."""

    def __init__(self) -> None:
        self.hours: list[float] = []
        self.battery: list[float | None] = []
        self.charging: list[bool] = []
        self.usage: list[bool] = []
        self.accuracy: list[tuple[float, float]] = []


def simulate(
    profile: DeviceProfile,
    out: Path | str,
    config: SimulationConfig = SimulationConfig(),
    *,
    calibration: Calibration | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``config.days`` days of ``profile``; write ``report.json`` and ``timeline.png`` in ``out``.

    Returns:
        The report (also in ``out / "report.json"``); its keys include ``profile``, ``days`` (a
        list with ``accuracy``, ``energy_j``, ``battery_share``, ``peak_memory_mb`` each) and
        ``memory_budget_mb``; ``targets`` says whether the night fit the budget and the battery.
    """
    from tqdm import tqdm

    from edge_sleep.bench.datasets import permuted_mnist
    from edge_sleep.bench.metrics import forgetting
    from edge_sleep.bench.pmnist import evaluate, pretrain
    from edge_sleep.config import SleepConfig, StoreConfig, WakeConfig
    from edge_sleep.runtime import EdgeSleep
    from edge_sleep.simulate.timeline import plot_timeline

    wall0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = config.threads or max(1, min(profile.cores, os.cpu_count() or 1))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if calibration is not None and calibration.threads not in (0, threads):
        torch.set_num_threads(threads_before)
        raise ConfigError("simulate", [
            f"the calibration was measured on {calibration.threads} thread(s); this night runs on {threads} (the "
            f"profile's {profile.cores} cores, at most this host's {os.cpu_count()}), and time per step does not "
            f"scale with threads. Fix: calibrate(threads={threads}), or python tools/calibrate.py --threads {threads}"])
    if calibration is not None and calibration.threads == 0:
        warnings.warn(f"the calibration does not say how many threads it was measured on; this night runs on {threads}: "
                      "if they differ, its time and energy are scaled wrongly. Fix: calibrate again (tools/calibrate.py "
                      "writes the thread count)", RuntimeWarning, stacklevel=2)
    cal = calibration or calibrate(threads=threads)  # in this process: it scales the wake steps' CPU time
    night_cals: list[dict[str, Any]] = []  # each night's own, measured around it in its process
    policy = make_policy(config.policy)
    device = device_conditions(policy)
    if device is None:
        raise ConfigError("simulate", [f"policy {type(policy).__name__} has no IdleAndCharging conditions"])
    plans = day_plans(profile, config)  # one per day, and the morning after the last night
    battery_j = profile.battery_wh * 3600.0
    end_s = config.days * DAY_S + first_use_h(plans[config.days]) * 3600.0  # through the last night, to the morning

    factory = import_model_factory(config.model)
    tasks = permuted_mnist(config.days + 1, config.seed, train_per_task=config.train_per_task,
                           test_per_task=config.test_per_task)
    model = _build(factory, config.seed)
    pretrain(model, tasks[0], lr=0.1)  # the base the app ships with

    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    ckpt = work / "ckpt"
    # the day simulate.json was made with (anchor 10.0; WakeConfig's default is now the tuned 3.0)
    wake_cfg = WakeConfig(train="adapters", lora_rank=8, lr=0.1, replay_batch=0, anchor_lambda=10.0)
    sleep_cfg = SleepConfig(memory_budget_mb=profile.memory_budget_mb, check_every=5)  # wake promptly
    es = EdgeSleep(model, store=work / "replay.db", store_config=StoreConfig(capacity_records=config.buffer_records),
                   wake=wake_cfg, sleep=sleep_cfg, seed=config.seed)
    probe = ProbeSet(config.probe_size, seed=config.seed)

    n = config.days + 1
    acc = np.full((n, n), np.nan)
    acc[0, 0] = evaluate(es, tasks[0])
    nights: list[_Night] = []
    windows: list[_Window] = []
    decisions: list[str] = []
    trace = _Trace()
    trace.accuracy.append((0.0, float(acc[0, 0])))
    wake_steps = [0] * config.days
    wake_device_s = [0.0] * config.days
    batches: dict[int, Any] = {}
    owed = 0.0
    battery = plans[0].start_battery_frac if profile.has_battery else None
    min_battery = [1.0] * config.days
    last_use_s = -DAY_S
    busy_until = 0.0
    blocked_until = 0.0
    measured = 0
    last_reason = ""
    window: _Window | None = None
    t = 0.0
    rules = profile.platform if config.platform else None
    if config.platform and rules is None:
        raise ConfigError("simulate", [f"platform=True, but profile {profile.key!r} has no [platform] table; expected "
                                       "one (see edge_sleep.simulate.profiles), or platform=False"])
    platform_rng = np.random.default_rng([config.seed, 24])
    step_device_s = 0.0  # the device time of one replay step, measured by the last run
    platform_counts = {"kills": 0, "interruptions": 0, "skipped_nights": 0, "start_delays": 0, "capped_runs": 0}

    def open_window(ts: float) -> _Window:
        w = _Window(night_day(ts), ts / 3600.0, start_at=ts)
        if rules is not None:  # what the OS decides for this window, drawn when it opens
            w.skip = bool(platform_rng.random() < rules.skip_probability)
            w.start_at = ts + float(platform_rng.uniform(0.0, rules.start_delay_max_s))
            if rules.interruptions_per_hour > 0:
                w.interrupt_at = ts + float(platform_rng.exponential(3600.0 / rules.interruptions_per_hour))
        return w

    def hour_of(ts: float) -> float:
        return (ts % DAY_S) / 3600.0

    def plan_at(ts: float) -> DayPlan:
        return plans[min(config.days, int(ts // DAY_S))]

    def charging_at(ts: float) -> bool:
        return (not profile.has_battery) or plan_at(ts).charging_at(hour_of(ts))

    def usage_at(ts: float) -> bool:
        return ts < config.days * DAY_S and plan_at(ts).in_usage(hour_of(ts))

    def morning(d: int) -> float:
        """When day ``d`` starts for the app: its first use (the measure after night ``d - 1`` comes before it)."""
        return d * DAY_S + first_use_h(plans[min(d, config.days)]) * 3600.0

    def window_end(ts: float) -> float:
        """When the charging-and-not-in-use stretch that holds ``ts`` ends (or the simulation)."""
        cur = ts
        while cur < end_s:
            base = math.floor(cur / DAY_S) * DAY_S
            nxt = base + plan_at(cur).next_change(hour_of(cur)) * 3600.0
            if nxt <= cur:  # guard against float rounding at a boundary
                nxt = cur + 1.0
            cur = nxt
            if cur >= end_s or usage_at(cur) or not charging_at(cur):
                return min(cur, end_s)
        return end_s

    def night_day(ts: float) -> int:
        """The day whose learning a night at ``ts`` consolidates (before the first use: yesterday's)."""
        d = int(ts // DAY_S)
        return min(config.days - 1, max(0, d if ts >= morning(d) else d - 1))

    def measure(ts: float) -> None:
        nonlocal measured
        row = measured + 1
        for j in range(row + 1):
            acc[row, j] = evaluate(es, tasks[j])
        trace.accuracy.append((ts / 3600.0, float(np.nanmean(acc[row, :row + 1]))))
        measured += 1

    def run_night(ts: float, steps: int | None, deadline: float, kill_at: float | None = None) -> _Night:
        nonlocal es
        day_i = night_day(ts)
        es.save(ckpt)
        es.store.close()
        job = NightJob(checkpoint=str(ckpt), model=config.model, result=str(work / "night.json"),
                       threads=threads, memory_budget_mb=profile.memory_budget_mb, budget_s=deadline - ts,
                       relative_speed=profile.relative_speed, steps=steps,
                       checkpoint_every_s=config.checkpoint_every_s if rules is not None else None,
                       kill_after_s=None if kill_at is None else kill_at - ts,
                       progress=str(work / "progress.json"),
                       calibration=None if calibration is None else calibration.to_dict())
        job.write(work / "job.json")
        Path(job.result).unlink(missing_ok=True)
        Path(job.progress or "").unlink(missing_ok=True)
        # OpenMP threads that wait passively: spin-waiting ones burn CPU time whenever another program
        # holds a core, which would count as the night's work
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.run([sys.executable, "-m", "edge_sleep.simulate.night", str(work / "job.json")],
                              env=env, capture_output=True, text=True)
        result: dict[str, Any] = json.loads(Path(job.result).read_text()) if Path(job.result).exists() else \
            {"failure": "error", "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
        es = EdgeSleep.load(ckpt, _build(factory, config.seed))
        if proc.returncode == KILLED_EXIT:  # the checkpoint holds what the last save held
            progress = json.loads(Path(job.progress or "").read_text()) if Path(job.progress or "").exists() else {}
            dev_s = float(progress.get("killed_at_s", 0.0))
            lost = max(0.0, dev_s - float(progress.get("saved_s", 0.0)))
            gap = float(progress.get("max_check_gap_s", 0.0))
            return _Night(day_i, ts / 3600.0, (ts + dev_s) / 3600.0, int(progress.get("steps", 0)), False,
                          0.0, dev_s, profile.power_active_w * dev_s, None, killed=True, lost_s=lost,
                          check_gap_s=gap)
        if result["failure"] is not None:
            why = (f"over the memory budget: {result['peak_mb']:.0f} MB > {profile.memory_budget_mb:.0f} MB"
                   if proc.returncode == OVER_BUDGET_EXIT or result["failure"] == "memory"
                   else result.get("error", "failed"))
            return _Night(day_i, ts / 3600.0, ts / 3600.0, 0, False, 0.0, 0.0, 0.0,
                          result.get("peak_mb"), result.get("process_peak_mb"), failure=why)
        rep = result["report"]
        night_cals.append(result["calibration"])
        dev_s = float(result["device_s"])
        return _Night(day_i, ts / 3600.0, (ts + dev_s) / 3600.0, int(rep["steps"]), bool(rep["completed"]),
                      float(result["host_cpu_s"]), dev_s, profile.power_active_w * dev_s, float(result["peak_mb"]),
                      float(result["process_peak_mb"]), stop_s=result.get("stop_s"),
                      check_gap_s=float(result.get("max_check_gap_s") or 0.0))

    total_ticks = int(math.ceil(end_s / config.tick_s))
    bar = tqdm(total=total_ticks, desc=f"simulate {profile.key} ({config.policy})", unit="tick",
               disable=not progress)
    while t < end_s:
        hour = hour_of(t)
        day_i = min(int(t // DAY_S), config.days - 1)
        # the morning after night d: measure every task seen so far, before the day's first use
        if measured < config.days and t >= morning(measured + 1) and t >= busy_until:
            measure(t)
        usage = usage_at(t)
        charging = charging_at(t)
        extra_w = 0.0
        if usage and window is not None:  # the user picked the device up: the window is over
            window.end_h = t / 3600.0
            window = None
        if usage and t >= busy_until:
            owed += plan_at(t).learn_steps_per_usage_hour * config.tick_s / 3600.0
            task = tasks[day_i + 1]
            t0 = time.process_time()
            while owed >= 1.0:
                owed -= 1.0
                it = batches.get(day_i)
                if it is None:
                    it = batches[day_i] = _cycle(task, config.batch)
                x, y = next(it)
                es.learn(x, y, stream=task.name)
                wake_steps[day_i] += 1
            dev_s = cal.device_seconds(time.process_time() - t0, relative_speed=profile.relative_speed)
            wake_device_s[day_i] += dev_s
            extra_w += profile.power_active_w * dev_s / config.tick_s
            last_use_s = t + config.tick_s
        elif not usage:
            state = DeviceState(charging=charging, battery_frac=battery, idle_s=max(0.0, t - last_use_s),
                                thermal="nominal", screen_on=False)
            why_not = device.device_allows(state)
            if why_not is None and window is None:
                window = open_window(t)
                windows.append(window)
            elif why_not is not None and window is not None:
                window.end_h = t / 3600.0
                window = None
            if t >= busy_until and t >= blocked_until:
                pending = es.sleep_state is not None
                drop = probe.drop(es) if why_not is None and config.policy == "adaptive" else None
                pressure = SleepPressure(wake_steps=es.wake_steps_since_sleep, accuracy_drop=drop,
                                         pending_night=pending)
                decision = policy.decide(state, pressure)
                if window is not None and (pressure.wake_steps > 0 or pending):
                    window.work_pending = True
                    if not decision.sleep and decision.reason not in window.reasons:
                        window.reasons.append(decision.reason)
                if decision.reason != last_reason:
                    decisions.append(f"day {day_i + 1} {hour:05.2f}h  {'SLEEP' if decision.sleep else 'wait '}  "
                                     f"{decision.reason}  [{state.describe()}]")
                    if log is not None:
                        log(decisions[-1])
                    last_reason = decision.reason
                if decision.sleep and window is not None and window.skip:  # the OS does not run it tonight
                    if not window.skipped:
                        window.skipped = True
                        platform_counts["skipped_nights"] += 1
                        decisions.append(f"day {day_i + 1} {hour:05.2f}h  OS     skipped this window's night")
                    blocked_until = window_end(t)
                elif decision.sleep and window is not None and t < window.start_at:  # the OS starts it later
                    if blocked_until < window.start_at:
                        platform_counts["start_delays"] += 1
                        decisions.append(f"day {day_i + 1} {hour:05.2f}h  OS     starts the night "
                                         f"{(window.start_at - t) / 60:.0f} min later")
                    blocked_until = window.start_at
                elif decision.sleep:
                    deadline = window_end(t)
                    capped = interrupted = False
                    kill_at = None
                    if rules is not None:
                        if rules.max_runtime_s > 0 and t + rules.max_runtime_s < deadline:
                            deadline, capped = t + rules.max_runtime_s, True
                        if window is not None and window.interrupt_at is not None and window.interrupt_at < deadline:
                            deadline, capped, interrupted = max(t + 1.0, window.interrupt_at), False, True
                        if platform_rng.random() < rules.kill_probability:
                            # somewhere in this run: up to its deadline, or to when the night should end
                            # at the device time per step measured so far
                            todo = decision.steps or (max(1, es.sleep_state.total_steps - es.sleep_state.step)
                                                      if es.sleep_state is not None else 1)
                            length = min(deadline - t, step_device_s * todo) if step_device_s else deadline - t
                            kill_at = t + float(platform_rng.uniform(0.0, max(1.0, length)))
                    night = run_night(t, decision.steps, deadline, kill_at)
                    if not night.killed and night.steps > 0:
                        step_device_s = night.device_s / night.steps
                    night.capped = capped and not night.killed and not night.completed
                    night.interrupted = interrupted and not night.killed and not night.completed
                    nights.append(night)
                    if window is not None:
                        window.used = night.failure is None
                    if night.failure is not None:
                        decisions.append(f"day {day_i + 1} {hour:05.2f}h  FAIL   {night.failure}")
                        blocked_until = deadline  # not again in this window
                    else:
                        busy_until = t + night.device_s
                        if night.killed:
                            platform_counts["kills"] += 1
                            decisions.append(f"day {day_i + 1} {hour:05.2f}h  KILL   after {night.device_s:.0f} s; "
                                             f"{night.lost_s:.0f} s of work since the last checkpoint lost")
                        if night.capped:
                            platform_counts["capped_runs"] += 1
                        if night.interrupted and window is not None and window.interrupt_at is not None:
                            platform_counts["interruptions"] += 1
                            decisions.append(f"day {day_i + 1} {hour:05.2f}h  USER   picked the device up; "
                                             "the night stopped and saved")
                            last_use_s = window.interrupt_at + 300.0  # five minutes of use
                            busy_until = max(busy_until, window.interrupt_at)
                            window.end_h = window.interrupt_at / 3600.0
                            window = None
                        if night.completed:
                            probe.refresh(es)
        # power over this tick: the device's own draw, compute, and the charger
        if battery is not None:
            overlap = max(0.0, min(t + config.tick_s, busy_until) - t)
            draw_w = (profile.power_use_w if usage else profile.power_idle_w) + extra_w \
                + profile.power_active_w * overlap / config.tick_s
            net_w = (profile.charge_w - draw_w) if charging and battery < 1.0 else (0.0 if charging else -draw_w)
            battery = min(1.0, max(0.0, battery + net_w * config.tick_s / battery_j))
            min_battery[day_i] = min(min_battery[day_i], battery)
        trace.hours.append(t / 3600.0)
        trace.battery.append(battery)
        trace.charging.append(charging)
        trace.usage.append(usage)
        t += config.tick_s
        bar.update(1)
    bar.close()
    while measured < config.days:  # the last morning
        measure(t)
    if window is not None:
        window.end_h = end_s / 3600.0
    es.store.close()

    days_out: list[dict[str, Any]] = []
    budget_fail = [x for x in nights if x.failure is not None and x.failure.startswith("over the memory")]
    for d in range(config.days):
        mine = [x for x in nights if x.day == d]
        energy = sum(x.energy_j for x in mine)
        row = acc[d + 1, : d + 2]
        peaks = [x.peak_mb for x in mine if x.peak_mb is not None]
        process_peaks = [x.process_peak_mb for x in mine if x.process_peak_mb is not None]
        wins = [w for w in windows if w.day == d]
        days_out.append({
            "day": d + 1,
            "accuracy": None if np.isnan(row).all() else float(np.nanmean(row)),
            "accuracy_per_task": [None if np.isnan(v) else float(v) for v in row],
            "forgetting": None if np.isnan(row).all() else float(forgetting(acc[: d + 2, : d + 2])),
            "wake_steps": wake_steps[d],
            "night_steps": sum(x.steps for x in mine),
            "nights_completed": sum(x.completed for x in mine),
            "windows_used": sum(w.used for w in wins),
            "windows_missed": sum(w.work_pending and not w.used for w in wins),
            "windows_preempted": sum(1 for x in mine if x.failure is None and not x.completed),
            "missed_reasons": sorted({r for w in wins if w.work_pending and not w.used for r in w.reasons}),
            "energy_j": energy,
            "battery_share": energy / battery_j if battery_j > 0 else None,
            "wake_energy_j": profile.power_active_w * wake_device_s[d],
            "night_device_s": sum(x.device_s for x in mine),
            "peak_memory_mb": max(peaks) if peaks else None,
            "process_peak_mb": max(process_peaks) if process_peaks else None,
            "min_battery_frac": min_battery[d] if battery is not None else None,
            "failures": [x.failure for x in mine if x.failure is not None],
            "lost_s": sum(x.lost_s for x in mine),
            "night_missed": wake_steps[d] > 0 and not any(x.completed for x in mine),
            "plan": {"usage": [list(w) for w in plans[d].usage], "charging": [list(w) for w in plans[d].charging],
                     "source": plans[d].source},
        })
    wall_s = time.perf_counter() - wall0
    shares = [d["battery_share"] for d in days_out if d["battery_share"] is not None]
    peaks_all = [d["peak_memory_mb"] for d in days_out if d["peak_memory_mb"] is not None]
    process_all = [d["process_peak_mb"] for d in days_out if d["process_peak_mb"] is not None]
    calibrations = _calibration_summary(cal, night_cals, measured=calibration is None)
    notes = []
    if calibrations["disagreement"] > DISAGREEMENT:
        note = (f"the host's calibrations disagree by {calibrations['disagreement']:.0%} (more than "
                f"{DISAGREEMENT:.0%}): its speed changed during the run, so device times are less certain")
        notes.append(note)
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    if process_all and max(process_all) > profile.memory_budget_mb:
        notes.append(f"the night's whole process peaked at {max(process_all):.0f} MB, over the "
                     f"{profile.memory_budget_mb:.0f} MB budget: that is the CPython/PyTorch process; the night's own "
                     f"memory was {max(peaks_all):.0f} MB")
    if budget_fail:
        notes.append(f"{len(budget_fail)} night(s) went over the {profile.memory_budget_mb:.0f} MB budget "
                     "and were stopped: this profile cannot run the night as configured")
    if not profile.has_battery:
        notes.append("mains-powered: no battery, so no battery share (energy in joules still counts)")
    if shares and max(shares) >= 0.02:
        notes.append(f"a night took {max(shares):.1%} of the battery (target < 2%)")
    if threads < profile.cores:
        notes.append(f"the host has {os.cpu_count()} cores; the night ran on {threads} threads and its time "
                     f"was scaled by the profile's relative speed ({profile.relative_speed})")
    final = acc[config.days, : config.days + 1]
    report = {
        "profile": profile.key,
        "profile_name": profile.name,
        "policy": config.policy,
        "config": asdict(config),
        "memory_budget_mb": profile.memory_budget_mb,
        "threads": threads,
        "relative_speed": profile.relative_speed,
        "calibration": calibrations,
        "days": days_out,
        "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in r] for r in acc],
        "final_accuracy": None if np.isnan(final).all() else float(np.nanmean(final)),
        "forgetting": float(forgetting(acc)) if not np.isnan(final).all() else None,
        "energy_j_total": sum(x.energy_j for x in nights),
        "days_from": config.days_from,
        "missed_nights": sum(d["night_missed"] for d in days_out),
        "nights": [asdict(x) for x in nights],
        "targets": {
            "wall_s": wall_s,
            "under_10_min": wall_s < 600.0,
            "fits_memory": not budget_fail and all(p <= profile.memory_budget_mb for p in peaks_all),
            "process_fits_memory": (max(process_all) <= profile.memory_budget_mb) if process_all else None,
            "memory_budget_source": profile.sources.get("memory_budget_mb"),
            "energy_under_2pct": (max(shares) < 0.02) if shares else None,
            "notes": notes,
        },
        "thermal": "not modelled (the simulated state is always 'nominal')",
        "platform": {
            "rules": rules is not None,
            "sources": {k: v for k, v in profile.sources.items() if k.startswith("platform.")} if rules else {},
            **platform_counts,
            "checkpoint_interval_s": config.checkpoint_every_s if rules is not None else None,
            "max_lost_s": max((x.lost_s for x in nights), default=0.0),
            "max_stop_s": max((x.stop_s for x in nights if x.stop_s is not None), default=None),
            "max_check_gap_s": max((x.check_gap_s for x in nights if x.check_gap_s is not None), default=None),
            "lost_within_bound": all(x.lost_s <= config.checkpoint_every_s + (x.check_gap_s or 0.0) + 1e-9
                                     for x in nights if x.killed),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "decisions.log").write_text("\n".join(decisions) + "\n")
    plot_timeline(trace.hours, trace.battery, trace.charging, trace.usage,
                  [(x.start_h, x.end_h, x.completed) for x in nights if x.failure is None],
                  trace.accuracy, out / "timeline.png",
                  title=f"{profile.name}: {config.days} days, {config.policy} policy")
    shutil.rmtree(work, ignore_errors=True)
    torch.set_num_threads(threads_before)
    return report


def day_plans(profile: DeviceProfile, config: SimulationConfig) -> list[DayPlan]:
    """The ``config.days + 1`` plans a simulation replays (the last one is the morning after the last night).

    Raises:
        ConfigError: ``days_from="drawn"`` on a profile without ``[variation]``.
        TraceError: the trace cannot be read or holds no whole day.
    """
    count = config.days + 1
    if config.days_from == "drawn":
        if profile.variation is None:
            raise ConfigError("simulate", [f"days_from='drawn', but profile {profile.key!r} has no [variation] table; "
                                           "expected one (see edge_sleep.simulate.profiles), or days_from='typical'"])
        return draw_days(profile.day, profile.variation, count, seed=config.seed)
    if config.days_from == "trace":
        from edge_sleep.simulate.trace import days_from_trace

        return cycle_days(days_from_trace(Path(str(config.trace)), tz=config.tz,
                                          learn_steps_per_usage_hour=profile.day.learn_steps_per_usage_hour), count)
    return [profile.day] * count


def _calibration_summary(cal: Calibration, nights: list[dict[str, Any]], *, measured: bool) -> dict[str, Any]:
    """Every calibration of a run: the simulator's own and each night's before and after it, and the
    nights' spread. The nights' are measured alike (a child process, OpenMP waiting passively) and
    span the run, so their spread shows a host whose speed changed. The simulator's own is left out
    of it: measured in this process, where OpenMP threads may spin while they wait, its CPU time is
    inflated (two to three times on two threads here), as are the wake steps it scales."""
    measured_nights = [Calibration.from_dict(c[k]) for c in nights for k in ("before", "after")]
    every = measured_nights or [cal]
    return {"clock": "cpu", "measured": measured, "simulator": cal.to_dict(),
            "nights": [{"before": c["before"]["host_seconds"], "after": c["after"]["host_seconds"]} for c in nights],
            "disagreement": disagreement(every), "within_20pct": disagreement(every) <= DISAGREEMENT}


def _build(factory: Callable[..., torch.nn.Module], seed: int) -> torch.nn.Module:
    """``factory(seed)`` when it takes an argument (the demo's ``mlp`` does), else ``factory()``."""
    import inspect

    try:
        takes_seed = len(inspect.signature(factory).parameters) > 0
    except (TypeError, ValueError):
        takes_seed = False
    return factory(seed) if takes_seed else factory()


def _cycle(task: Any, batch: int) -> Any:
    while True:
        yield from task.batches(batch)
