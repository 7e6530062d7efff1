"""When to sleep: the device's state from real probes, and the policies that decide.

- :class:`DeviceState`: charging, battery fraction, idle seconds, thermal state, screen; every
  field may be ``None`` (or ``"unknown"``) where a probe has nothing (a server has no battery).
- :class:`LinuxProbe` reads it from Linux: ``/sys/class/power_supply`` (batteries and mains; a
  board on mains with no charger to read says so with ``mains=True``), ``/sys/class/thermal``
  (the hottest zone of a CPU, SoC or skin type: other zones are ignored), ``/sys/class/backlight``
  (the screen), an activity file the app touches when its user is active (:func:`mark_activity`),
  the CPU time other processes use, and, where sysfs has no power supply,
  ``psutil.sensors_battery()``. The terminals' access times (``w``'s idle) only when asked.
- :class:`SleepPolicy` is the protocol: ``decide(state, pressure) -> Decision``. It returns a
  value and never touches the runtime.
- :class:`IdleAndCharging` mirrors Android WorkManager's ``requiresCharging`` /
  ``requiresDeviceIdle`` / ``requiresBatteryNotLow`` and iOS
  ``BGProcessingTask.requiresExternalPower``; its night is a fixed ``steps_per_wake_step`` times
  the day's wake steps (1:1 by default).
- :class:`AdaptivePolicy` adds sleep pressure (:class:`SleepPressure`: wake steps since the last
  night and the drop in accuracy on a small probe set of stored records, :class:`ProbeSet`), and
  chooses the night's length from it: a short night when nothing was forgotten, a longer one
  when the probe set says the day cost accuracy.

Example:
    >>> state = DeviceState(charging=True, battery_frac=0.8, idle_s=3600.0, thermal="nominal",
    ...                     screen_on=False)
    >>> IdleAndCharging().decide(state, SleepPressure(wake_steps=120)).steps
    120
    >>> IdleAndCharging().decide(DeviceState(charging=False), SleepPressure(wake_steps=120)).reason
    'not charging (requires external power)'
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from edge_sleep.errors import ConfigError

if TYPE_CHECKING:
    from edge_sleep.runtime import EdgeSleep

__all__ = [
    "THERMAL_STATES",
    "DeviceState",
    "LinuxProbe",
    "CpuLoad",
    "mark_activity",
    "THERMAL_ZONE_TYPES",
    "thermal_state",
    "SleepPressure",
    "Decision",
    "SleepPolicy",
    "IdleAndCharging",
    "AdaptivePolicy",
    "device_conditions",
    "ProbeSet",
]

# iOS ProcessInfo.ThermalState's four levels, and "unknown" where no sensor answers
THERMAL_STATES = ("nominal", "fair", "serious", "critical", "unknown")
# thermal zones whose type names one of these (case-insensitive) are read; a Wi-Fi card's or a
# disabled sensor's zone (some boards have one that always reads 100 C) is not the device's heat
THERMAL_ZONE_TYPES = ("cpu", "soc", "pkg", "package", "core", "acpitz", "skin", "gpu", "battery", "tsens", "big",
                      "little", "mid")


@dataclass(frozen=True)
class DeviceState:
    """What the device is doing now. ``None`` / ``"unknown"``: the probe could not tell.

    Attributes:
        charging: on external power (charging, full, or a mains-powered board).
        battery_frac: battery level in ``[0, 1]``; ``None`` without a battery.
        idle_s: seconds since the user last used the device.
        thermal: one of :data:`THERMAL_STATES`.
        screen_on: the display is on.
        temperature_c: the hottest thermal zone, in degrees Celsius.
        cpu_load: the share of all cores other processes kept busy since the last probe.
    """

    charging: bool | None = None
    battery_frac: float | None = None
    idle_s: float | None = None
    thermal: str = "unknown"
    screen_on: bool | None = None
    temperature_c: float | None = None
    cpu_load: float | None = None

    def describe(self) -> str:
        """One line for a log: ``charging=yes battery=81% idle=3600s thermal=nominal screen=off``."""
        def yn(v: bool | None, yes: str = "yes", no: str = "no") -> str:
            return "unknown" if v is None else (yes if v else no)

        battery = "none" if self.battery_frac is None else f"{self.battery_frac:.0%}"
        idle = "unknown" if self.idle_s is None else f"{self.idle_s:.0f}s"
        temp = "" if self.temperature_c is None else f" ({self.temperature_c:.0f} C)"
        load = "" if self.cpu_load is None else f" cpu={self.cpu_load:.0%}"
        return (f"charging={yn(self.charging)} battery={battery} idle={idle} "
                f"thermal={self.thermal}{temp} screen={yn(self.screen_on, 'on', 'off')}{load}")


def thermal_state(temperature_c: float | None, *, fair_c: float = 60.0, serious_c: float = 75.0,
                  critical_c: float = 90.0) -> str:
    """Map the hottest zone's temperature to a :data:`THERMAL_STATES` level.

    Example:
        >>> [thermal_state(t) for t in (41.0, 66.0, 80.0, 95.0, None)]
        ['nominal', 'fair', 'serious', 'critical', 'unknown']
    """
    if temperature_c is None:
        return "unknown"
    if temperature_c >= critical_c:
        return "critical"
    if temperature_c >= serious_c:
        return "serious"
    return "fair" if temperature_c >= fair_c else "nominal"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def mark_activity(path: Path | str, when: float | None = None) -> None:
    """Say the user is active now: what an app calls (on a touch, a request) so that a watcher
    probing with ``LinuxProbe(activity_file=path)`` counts idle time from here. Creates the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    os.utime(path, None if when is None else (when, when))


class CpuLoad:
    """The share of all cores that *other* processes kept busy between two calls.

    The system's busy CPU time (``psutil.cpu_times``) minus this process's own (its threads
    included: a night running here does not count as load), over the wall time times the cores.
    The first call has nothing to compare with and returns ``None``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: tuple[float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        own = psutil.Process().cpu_times()
        return self.clock(), busy, own.user + own.system

    def __call__(self) -> float | None:
        now = self._sample()
        last, self._last = self._last, now
        if last is None or now[0] <= last[0]:
            return None
        cores = os.cpu_count() or 1
        others = (now[1] - last[1]) - (now[2] - last[2])
        return min(1.0, max(0.0, others / ((now[0] - last[0]) * cores)))


class LinuxProbe:
    """Reads :class:`DeviceState` from Linux. Every root is a parameter so tests use fake trees.

    Args:
        sys_root: where ``class/power_supply``, ``class/thermal`` and ``class/backlight`` live.
        dev_root: where the terminals (``pts/*``, ``tty*``) live (read with ``use_terminals``).
        clock: wall-clock seconds (``time.time``), for the idle time.
        use_psutil: ask ``psutil.sensors_battery()`` when sysfs lists no power supply.
        thermal_thresholds_c: ``(fair, serious, critical)`` for :func:`thermal_state`.
        mains: the device runs on mains power (a board with no charger sysfs can read): always
            counted as on external power.
        activity_file: a file the app touches when its user is active (:func:`mark_activity`);
            idle time is the time since it was last touched (``None`` where it does not exist yet).
        use_terminals: also count the terminals' access times (``w``'s IDLE column): right for a
            laptop someone types on, wrong for a server or a board.
        cpu_load: measures other processes' CPU share (default :class:`CpuLoad`); ``None`` skips it.
        thermal_types: the zone types read (substrings, case-insensitive); ``None`` reads every zone.
    """

    def __init__(self, *, sys_root: Path | str = "/sys", dev_root: Path | str = "/dev",
                 clock: Callable[[], float] = time.time, use_psutil: bool = True,
                 thermal_thresholds_c: tuple[float, float, float] = (60.0, 75.0, 90.0), mains: bool = False,
                 activity_file: Path | str | None = None, use_terminals: bool = False,
                 cpu_load: Callable[[], float | None] | None | str = "default",
                 thermal_types: tuple[str, ...] | None = THERMAL_ZONE_TYPES) -> None:
        self.sys_root, self.dev_root = Path(sys_root), Path(dev_root)
        self.clock, self.use_psutil = clock, use_psutil
        self.thresholds = thermal_thresholds_c
        self.mains, self.use_terminals = mains, use_terminals
        self.activity_file = None if activity_file is None else Path(activity_file)
        self.cpu_load: Callable[[], float | None] | None = CpuLoad() if cpu_load == "default" else cpu_load  # type: ignore[assignment]
        self.thermal_types = None if thermal_types is None else tuple(t.lower() for t in thermal_types)

    def __call__(self) -> DeviceState:
        charging, battery = self.power()
        temp = self.temperature_c()
        fair, serious, critical = self.thresholds
        return DeviceState(charging=charging, battery_frac=battery, idle_s=self.idle_s(),
                           thermal=thermal_state(temp, fair_c=fair, serious_c=serious, critical_c=critical),
                           screen_on=self.screen_on(), temperature_c=temp,
                           cpu_load=None if self.cpu_load is None else self.cpu_load())

    def power(self) -> tuple[bool | None, float | None]:
        """``(on external power, battery fraction)`` from sysfs, else psutil, else ``(None, None)``;
        on external power whatever they say with ``mains=True``."""
        charging, battery = self._supplies()
        return (True if self.mains else charging), battery

    def _supplies(self) -> tuple[bool | None, float | None]:
        root = self.sys_root / "class" / "power_supply"
        supplies = sorted(root.iterdir()) if root.is_dir() else []
        fracs: list[float] = []
        statuses: list[str] = []
        mains: list[bool] = []
        for s in supplies:
            kind = (_read(s / "type") or "").lower()
            if kind == "battery":
                if _read(s / "present") == "0":
                    continue
                frac = self._battery_frac(s)
                if frac is not None:
                    fracs.append(frac)
                statuses.append((_read(s / "status") or "").lower())
            elif kind:  # Mains, USB, USB_C, USB_PD, Wireless...
                online = _read(s / "online")
                if online is not None:
                    mains.append(online == "1")
        if fracs or statuses or mains:
            battery = float(np.mean(fracs)) if fracs else None
            if any(mains):
                return True, battery
            if statuses and any(st in ("charging", "full", "not charging") for st in statuses):
                return True, battery
            if statuses and any(st == "discharging" for st in statuses):
                return False, battery
            return (False if mains else None), battery
        if self.use_psutil:
            return _psutil_power()
        return None, None

    @staticmethod
    def _battery_frac(s: Path) -> float | None:
        capacity = _number(s / "capacity")
        if capacity is not None:
            return min(1.0, max(0.0, capacity / 100.0))
        for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            a, b = _number(s / now), _number(s / full)
            if a is not None and b:
                return min(1.0, max(0.0, a / b))
        return None

    def temperature_c(self) -> float | None:
        """The hottest thermal zone of a read type, in degrees Celsius (sysfs gives millidegrees);
        readings outside -40 to 150 C are a sensor's error codes, not heat."""
        root = self.sys_root / "class" / "thermal"
        temps = []
        for z in sorted(root.glob("thermal_zone*")) if root.is_dir() else []:
            kind = (_read(z / "type") or "").lower()
            if self.thermal_types is not None and not any(t in kind for t in self.thermal_types):
                continue
            t = _number(z / "temp")
            if t is not None and -40.0 <= t / 1000.0 <= 150.0:
                temps.append(t / 1000.0)
        return max(temps) if temps else None

    def screen_on(self) -> bool | None:
        """A backlight with ``bl_power`` 0 and a non-zero brightness means the screen is on."""
        root = self.sys_root / "class" / "backlight"
        lights = sorted(root.iterdir()) if root.is_dir() else []
        if not lights:
            return None
        return any(_read(b / "bl_power") in (None, "0") and (_number(b / "brightness") or 0) > 0
                   for b in lights)

    def idle_s(self) -> float | None:
        """Seconds since the activity file was touched or (``use_terminals``) a terminal was
        read from, whichever is later; ``None`` when neither tells."""
        ttys = list(self.dev_root.glob("pts/[0-9]*")) + list(self.dev_root.glob("tty[0-9]*")) \
            if self.use_terminals else []
        latest = None
        if self.activity_file is not None:
            with contextlib.suppress(OSError):
                latest = os.stat(self.activity_file).st_mtime
        for t in ttys:
            try:
                a = os.stat(t).st_atime
            except OSError:
                continue
            latest = a if latest is None else max(latest, a)
        return None if latest is None else max(0.0, self.clock() - latest)


def _psutil_power() -> tuple[bool | None, float | None]:
    try:
        import psutil
    except ImportError:
        return None, None
    sensors = getattr(psutil, "sensors_battery", None)
    battery = sensors() if sensors is not None else None
    if battery is None:
        return None, None
    plugged = battery.power_plugged
    return (None if plugged is None else bool(plugged)), float(battery.percent) / 100.0


@dataclass(frozen=True)
class SleepPressure:
    """How much the model needs a night.

    Attributes:
        wake_steps: wake steps since the last completed night.
        accuracy_drop: accuracy on the probe set at the end of the last night minus now
            (positive: forgotten); ``None`` without a probe set.
        pending_night: a preempted night waits to be resumed.
    """

    wake_steps: int
    accuracy_drop: float | None = None
    pending_night: bool = False


@dataclass(frozen=True)
class Decision:
    """A policy's answer: sleep now (with ``steps`` replay steps for a new night) or not, and why."""

    sleep: bool
    reason: str
    steps: int | None = None


class SleepPolicy(Protocol):
    """Decides whether to sleep now and how long a new night is. Never mutates the runtime."""

    def decide(self, state: DeviceState, pressure: SleepPressure) -> Decision: ...


@dataclass(frozen=True)
class IdleAndCharging:
    """Sleep when charging, idle, the battery is not low and the device is not hot.

    The conditions of Android WorkManager (``setRequiresCharging``, ``setRequiresDeviceIdle``,
    ``setRequiresBatteryNotLow``) and iOS ``BGProcessingTaskRequest.requiresExternalPower``.

    Args:
        min_idle_s: the user has not used the device for this long (and the screen is off).
        min_battery_frac: refuse below this battery level (Android's "battery low" is 15%).
        max_thermal: the hottest :data:`THERMAL_STATES` level allowed.
        require_charging: on external power only.
        assume_idle_when_unknown: where no probe tells idle time or screen (a headless board),
            count the device as idle; else refuse.
        max_cpu_load: refuse while other processes keep more than this share of the cores busy
            (a server or board at work is not idle, whatever its terminals say).
        steps_per_wake_step: the night's length per wake step since the last night (1:1).
        min_steps: the shortest night.
    """

    min_idle_s: float = 900.0
    min_battery_frac: float = 0.15
    max_thermal: str = "fair"
    require_charging: bool = True
    assume_idle_when_unknown: bool = True
    max_cpu_load: float = 0.5
    steps_per_wake_step: float = 1.0
    min_steps: int = 50

    def __post_init__(self) -> None:
        problems = []
        if not self.min_idle_s >= 0:
            problems.append(f"min_idle_s={self.min_idle_s}; expected >= 0")
        if not 0 <= self.min_battery_frac <= 1:
            problems.append(f"min_battery_frac={self.min_battery_frac}; expected a fraction in [0, 1]")
        if self.max_thermal not in THERMAL_STATES[:4]:
            problems.append(f"max_thermal={self.max_thermal!r}; expected one of {THERMAL_STATES[:4]}")
        if not 0 < self.max_cpu_load <= 1:
            problems.append(f"max_cpu_load={self.max_cpu_load}; expected a share of the cores in (0, 1]")
        if not self.steps_per_wake_step > 0:
            problems.append(f"steps_per_wake_step={self.steps_per_wake_step}; expected > 0")
        if self.min_steps < 1:
            problems.append(f"min_steps={self.min_steps}; expected >= 1")
        if problems:
            raise ConfigError(type(self).__name__, problems)

    def device_allows(self, state: DeviceState) -> str | None:
        """``None`` when the device's state allows a night, else why not."""
        if self.require_charging and state.charging is not True:
            return ("not charging (requires external power)" if state.charging is False
                    else "charging state unknown (requires external power)")
        if state.screen_on:
            return "screen on"
        if state.idle_s is None and state.screen_on is None and not self.assume_idle_when_unknown:
            return "idle time unknown"
        if state.idle_s is not None and state.idle_s < self.min_idle_s:
            return f"idle {state.idle_s:.0f}s < {self.min_idle_s:.0f}s"
        if state.cpu_load is not None and state.cpu_load > self.max_cpu_load:
            return f"cpu busy: other processes use {state.cpu_load:.0%} of the cores > {self.max_cpu_load:.0%}"
        if state.battery_frac is not None and state.battery_frac < self.min_battery_frac:
            return f"battery {state.battery_frac:.0%} < {self.min_battery_frac:.0%}"
        if THERMAL_STATES.index(state.thermal) > THERMAL_STATES.index(self.max_thermal) \
                and state.thermal != "unknown":
            return f"thermal {state.thermal} above {self.max_thermal}"
        return None

    def night_steps(self, pressure: SleepPressure) -> int:
        return max(self.min_steps, round(self.steps_per_wake_step * pressure.wake_steps))

    def gate(self, state: DeviceState, pressure: SleepPressure) -> Decision | None:
        """The decision every policy on these conditions shares, or ``None`` when a new night
        may start and its length is the policy's to choose: no work, the device refuses, or a
        preempted night to resume."""
        if pressure.wake_steps == 0 and not pressure.pending_night:
            return Decision(False, "nothing to consolidate (no wake steps since the last night)")
        why_not = self.device_allows(state)
        if why_not is not None:
            return Decision(False, why_not)
        if pressure.pending_night:
            return Decision(True, "resume the preempted night")
        return None

    def decide(self, state: DeviceState, pressure: SleepPressure) -> Decision:
        shared = self.gate(state, pressure)
        if shared is not None:
            return shared
        steps = self.night_steps(pressure)
        return Decision(True, f"idle and charging: {steps} steps for {pressure.wake_steps} wake steps", steps)


@dataclass(frozen=True)
class AdaptivePolicy:
    """:class:`IdleAndCharging`'s conditions, with the night's length chosen by sleep pressure.

    The night is ``ratio * wake_steps`` replay steps, ``ratio`` growing with the probe set's
    accuracy drop: ``min_ratio`` when nothing was forgotten, ``max_ratio`` at a drop of
    ``full_drop`` or more (linear between). A day with fewer than ``min_wake_steps`` wake steps
    and no drop waits for a later night.

    Args:
        device: the device conditions (an :class:`IdleAndCharging`; its step ratio is unused).
        min_ratio: replay steps per wake step at no drop.
        max_ratio: replay steps per wake step at a drop of ``full_drop``.
        full_drop: the probe accuracy drop that earns the longest night.
        min_wake_steps: below this, with no measured drop, do not sleep yet.
    """

    device: IdleAndCharging = IdleAndCharging()
    min_ratio: float = 0.5
    max_ratio: float = 2.0
    full_drop: float = 0.10
    min_wake_steps: int = 20

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.min_ratio <= self.max_ratio:
            problems.append(f"min_ratio={self.min_ratio}, max_ratio={self.max_ratio}; expected 0 < min <= max")
        if not self.full_drop > 0:
            problems.append(f"full_drop={self.full_drop}; expected > 0")
        if self.min_wake_steps < 0:
            problems.append(f"min_wake_steps={self.min_wake_steps}; expected >= 0")
        if problems:
            raise ConfigError(type(self).__name__, problems)

    def ratio(self, accuracy_drop: float | None) -> float:
        """Replay steps per wake step for a probe drop (``None``: halfway)."""
        if accuracy_drop is None:
            return (self.min_ratio + self.max_ratio) / 2
        t = min(1.0, max(0.0, accuracy_drop / self.full_drop))
        return self.min_ratio + t * (self.max_ratio - self.min_ratio)

    def decide(self, state: DeviceState, pressure: SleepPressure) -> Decision:
        shared = self.device.gate(state, pressure)
        if shared is not None:
            return shared
        drop = pressure.accuracy_drop
        if pressure.wake_steps < self.min_wake_steps and (drop is None or drop <= 0):
            return Decision(False, f"low pressure: {pressure.wake_steps} wake steps < {self.min_wake_steps} "
                                   "and no accuracy drop")
        ratio = self.ratio(drop)
        steps = max(self.device.min_steps, round(ratio * pressure.wake_steps))
        shown = "unknown" if drop is None else f"{drop:+.3f}"
        return Decision(True, f"pressure: {pressure.wake_steps} wake steps, probe drop {shown} -> "
                              f"{ratio:.2f} x = {steps} steps", steps)


def device_conditions(policy: SleepPolicy) -> IdleAndCharging | None:
    """The device conditions a policy applies (the policy itself, or its ``device``), if any:
    what a running night asks again between chunks to know when to wake up."""
    device = getattr(policy, "device", policy)
    return device if isinstance(device, IdleAndCharging) else None


class ProbeSet:
    """A few stored records whose accuracy, measured after each night, tracks forgetting.

    Args:
        size: records in the probe set (drawn from the store at :meth:`refresh`).
        seed: the draw's seed (its own generator: the runtime's randomness is left alone).
    """

    def __init__(self, size: int = 256, seed: int = 0) -> None:
        if size < 1:
            raise ConfigError("ProbeSet", [f"size={size}; expected >= 1"])
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.slots: np.ndarray = np.zeros(0, dtype=np.int64)
        self.baseline: float | None = None

    def refresh(self, es: EdgeSleep) -> None:
        """Draw new probe records from the store and measure the model on them (after a night)."""
        slots = es.store.slots()
        if slots.size == 0:
            self.slots, self.baseline = slots, None
            return
        self.slots = np.sort(self.rng.choice(slots, size=min(self.size, slots.size), replace=False))
        self.baseline = self.accuracy(es)

    def accuracy(self, es: EdgeSleep) -> float | None:
        """The model's accuracy on the probe records still in the store (``None`` if none)."""
        live = np.intersect1d(self.slots, es.store.slots())
        if live.size == 0:
            return None
        batch = es.store.read(live)
        pred = es.record_logits(batch.x).argmax(dim=1).cpu()
        return float((pred == batch.y).float().mean())

    def drop(self, es: EdgeSleep) -> float | None:
        """Accuracy at the last :meth:`refresh` minus now (positive: forgotten)."""
        now = self.accuracy(es)
        return None if now is None or self.baseline is None else self.baseline - now

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": 1, "size": self.size, "slots": torch.from_numpy(self.slots.copy()),
                "baseline": self.baseline, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from edge_sleep.errors import check_format_version

        check_format_version("ProbeSet state", state.get("format_version"), 1)
        self.size = int(state["size"])
        self.slots = np.asarray(state["slots"], dtype=np.int64)
        self.baseline = state["baseline"]
        self.rng.bit_generator.state = state["rng"]
