"""Device profiles: one TOML file per real device in ``device_profiles/``, read and validated.

A profile gives what the simulator needs to replay a day on a device: its cores, memory and the
app's memory budget, battery and power draw, its speed relative to the reference machine on the
reference workload (:mod:`edge_sleep.simulate.calibrate`), and a typical day. Every number names
its source (a spec sheet, a published measurement) or says ``estimate: ...``.

The file's schema (every key is required; unknown keys are errors, so a typo never passes)::

    name = "Samsung Galaxy S24"      # display name
    kind = "phone"                   # "phone" or "board"

    [hardware]                       # each field: {value = <number>, source = "<non-empty>"}
    cores = { value = 8, source = "..." }
    memory_mb = { value = 8192, source = "..." }
    memory_budget_mb = { value = 512, source = "estimate: ..." }
    battery_wh = { value = 15.5, source = "..." }
    power_use_w = { value = 2.0, source = "..." }
    power_idle_w = { value = 0.06, source = "..." }
    power_active_w = { value = 3.5, source = "..." }
    charge_w = { value = 15.0, source = "..." }
    relative_speed = { value = 2.6, source = "estimate: ..." }

    [day]
    source = "estimate: ..."         # covers every field of [day]
    usage = [[7.0, 8.0], [12.5, 13.0], [18.0, 21.5]]   # hours, [start, end)
    charging = [[0.0, 6.5], [23.0, 24.0]]
    start_battery_frac = 0.6
    learn_steps_per_usage_hour = 40

    [platform]                       # optional: the OS's rules for background work, each {value, source}
    max_runtime_s = { value = 600, source = "..." }          # one run's cap; 0: none
    start_delay_max_s = { value = 1800, source = "..." }     # the OS starts the work up to this late
    skip_probability = { value = 0.05, source = "..." }      # the OS does not run it in a window
    interruptions_per_hour = { value = 0.1, source = "..." } # the user picks the device up
    kill_probability = { value = 0.1, source = "..." }       # a run is killed without warning

    [variation]                      # optional: how one day differs from the next, each {value, source}
    shift_sd_min = { value = 30, source = "..." }               # each window edge moves by N(0, sd) min
    missed_charge_probability = { value = 0.1, source = "..." } # no overnight charge that night
    topup_probability = { value = 0.3, source = "..." }         # a daytime top-up charge that day
    topup_min = { value = 45, source = "..." }                  # its length
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sleep.errors import EdgeSleepError, InputError

__all__ = ["DayPlan", "DayVariation", "DeviceProfile", "PlatformRules", "ProfileError", "load_profile", "profile_dir",
           "profile_names"]

_ENV_DIR = "EDGE_SLEEP_PROFILES"
_HOURS_PER_DAY = 24.0


class ProfileError(EdgeSleepError, ValueError):
    """A device profile cannot be found, read or validated; every problem of one file is listed.

    Args:
        path: the profile file (or, for an unknown name, the file that was looked for).
        problems: one line per problem; each names the dotted field, the value, what was
            expected and the fix.
    """

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"device profile {self.path} has {len(self.problems)} problem(s):\n{lines}")

    def __reduce__(self) -> tuple[type[ProfileError], tuple[Path, list[str]]]:
        return (type(self), (self.path, self.problems))


def _check_hour(hour: float) -> None:
    if isinstance(hour, bool) or not isinstance(hour, (int, float)) or not 0.0 <= hour < _HOURS_PER_DAY:
        raise InputError(
            f"hour={hour!r}; expected a number in [0, 24). Fix: pass the hour of the day "
            "(for a multi-day clock, pass `hours % 24`)."
        )


@dataclass(frozen=True)
class DayPlan:
    """A typical day, in hours since midnight (windows are half-open ``[start, end)``).

    Attributes:
        usage: windows when the screen is on and the user uses the app (wake learning happens in
            them); ``0 <= start < end <= 24``, sorted, not overlapping.
        charging: windows on the charger (a night can run in them when the screen is off).
        start_battery_frac: battery fraction at midnight of the first day (``0 < f <= 1``).
        learn_steps_per_usage_hour: wake steps (labelled batches) the app learns per hour of use.
        source: where the day comes from (a trace file, a study, or ``estimate: ...``).

    Example:
        >>> day = DayPlan(usage=((7.0, 8.0), (18.0, 21.5)), charging=((0.0, 6.5), (23.0, 24.0)),
        ...               start_battery_frac=0.6, learn_steps_per_usage_hour=40.0,
        ...               source="estimate: example")
        >>> day.in_usage(7.5), day.in_usage(8.0), day.charging_at(6.0), day.charging_at(6.5)
        (True, False, True, False)
        >>> day.usage_hours(), day.next_change(8.0), day.next_change(21.5)
        (4.5, 18.0, 23.0)
        >>> print(day.to_toml().splitlines()[2])
        usage = [[7.0, 8.0], [18.0, 21.5]]
    """

    usage: tuple[tuple[float, float], ...]
    charging: tuple[tuple[float, float], ...]
    start_battery_frac: float
    learn_steps_per_usage_hour: float
    source: str

    def in_usage(self, hour: float) -> bool:
        """Whether ``hour`` falls in a usage window.

        Args:
            hour: hour of the day, in ``[0, 24)``.

        Returns:
            ``True`` when ``start <= hour < end`` for some usage window.

        Raises:
            InputError: ``hour`` is not a number in ``[0, 24)``.
        """
        _check_hour(hour)
        return any(start <= hour < end for start, end in self.usage)

    def charging_at(self, hour: float) -> bool:
        """Whether the device is on the charger at ``hour``.

        Args:
            hour: hour of the day, in ``[0, 24)``.

        Returns:
            ``True`` when ``start <= hour < end`` for some charging window.

        Raises:
            InputError: ``hour`` is not a number in ``[0, 24)``.
        """
        _check_hour(hour)
        return any(start <= hour < end for start, end in self.charging)

    def usage_hours(self) -> float:
        """Hours of use in the day.

        Returns:
            The summed length of the usage windows, in hours.
        """
        return float(sum(end - start for start, end in self.usage))

    def next_change(self, hour: float) -> float:
        """The next hour at which usage or charging may change.

        Args:
            hour: hour of the day, in ``[0, 24)``.

        Returns:
            The smallest window boundary (a start or end of any usage or charging window, or
            ``24.0``) strictly greater than ``hour``.

        Raises:
            InputError: ``hour`` is not a number in ``[0, 24)``.
        """
        _check_hour(hour)
        bounds = [b for window in (*self.usage, *self.charging) for b in window if b > hour]
        return float(min(bounds, default=_HOURS_PER_DAY))

    def to_toml(self) -> str:
        """The ``[day]`` table of a profile file, in the schema :func:`load_profile` reads.

        Returns:
            TOML text starting with ``[day]`` and ending with a newline.
        """
        steps = self.learn_steps_per_usage_hour
        steps_text = str(int(steps)) if float(steps).is_integer() else _toml_float(steps)
        return (
            "[day]\n"
            f"source = {_toml_string(self.source)}\n"
            f"usage = {_toml_windows(self.usage)}\n"
            f"charging = {_toml_windows(self.charging)}\n"
            f"start_battery_frac = {_toml_float(self.start_battery_frac)}\n"
            f"learn_steps_per_usage_hour = {steps_text}\n"
        )


def _toml_float(x: float) -> str:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_windows(windows: tuple[tuple[float, float], ...]) -> str:
    return "[" + ", ".join(f"[{_toml_float(s)}, {_toml_float(e)}]" for s, e in windows) + "]"


@dataclass(frozen=True)
class PlatformRules:
    """What the operating system does to background work (a profile's ``[platform]`` table).

    Attributes:
        max_runtime_s: one run's cap (Android WorkManager stops a worker after 10 minutes);
            the work is stopped (it may checkpoint) and runs again later; ``0``: no cap.
        start_delay_max_s: the OS starts the work up to this long after its conditions hold
            (drawn uniformly per window).
        skip_probability: the OS does not run the work at all in a window.
        interruptions_per_hour: the user picks the device up while the work runs (a Poisson
            rate): the work is stopped and the window ends.
        kill_probability: a run is killed without warning (low-memory killer, jetsam): what it
            did since its last checkpoint is lost.
    """

    max_runtime_s: float = 0.0
    start_delay_max_s: float = 0.0
    skip_probability: float = 0.0
    interruptions_per_hour: float = 0.0
    kill_probability: float = 0.0


@dataclass(frozen=True)
class DayVariation:
    """How one day differs from the next (a profile's ``[variation]`` table).

    :func:`edge_sleep.simulate.days.draw_days` draws each simulated day from the typical day with it.

    Attributes:
        shift_sd_min: each start and end of a usage or charging window (other than midnight) moves
            by a normal draw of this standard deviation, in minutes (rounded to 5 minutes).
        missed_charge_probability: the overnight charge (the charging that runs through midnight)
            does not happen that night.
        topup_probability: a daytime top-up charge of ``topup_min`` minutes happens that day,
            starting at a uniformly drawn time between 09:00 and 18:00.
        topup_min: a top-up's length in minutes.
    """

    shift_sd_min: float = 0.0
    missed_charge_probability: float = 0.0
    topup_probability: float = 0.0
    topup_min: float = 0.0


@dataclass(frozen=True)
class DeviceProfile:
    """One device. Power in watts, energy capacity in watt-hours, memory in MiB.

    Attributes:
        name: display name ("Samsung Galaxy S24"); key: the file's stem ("galaxy-s24").
        kind: ``"phone"`` or ``"board"``.
        cores: threads the night may use.
        memory_mb: the device's RAM; memory_budget_mb: what the app may use (the night included).
        battery_wh: battery capacity; ``0`` for a mains-powered board (always "charging").
        power_use_w: the whole device's draw while the user uses it (screen on).
        power_idle_w: its draw idle with the screen off.
        power_active_w: the extra draw while the CPU runs the model (wake steps, a night).
        charge_w: power into the battery on the charger (0 for mains-powered boards).
        relative_speed: throughput on the reference workload relative to the reference machine.
        day: the typical day.
        platform: the OS's rules for background work (``None``: the profile gives none).
        variation: how its days differ (``None``: the profile gives none).
        sources: field name -> where its number comes from (each hardware field, ``"day"``, and
            each ``"platform.<field>"`` and ``"variation.<field>"``).
        path: the file it was read from.
    """

    key: str
    name: str
    kind: str
    cores: int
    memory_mb: float
    memory_budget_mb: float
    battery_wh: float
    power_use_w: float
    power_idle_w: float
    power_active_w: float
    charge_w: float
    relative_speed: float
    day: DayPlan
    sources: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    platform: PlatformRules | None = None
    variation: DayVariation | None = None

    @property
    def has_battery(self) -> bool:
        """Whether the device runs on a battery (``battery_wh > 0``)."""
        return self.battery_wh > 0


def profile_dir() -> Path:
    """The folder profiles are looked up in by name.

    Returns:
        ``$EDGE_SLEEP_PROFILES`` when set (and non-empty), else the repository's top-level
        ``device_profiles/``.
    """
    env = os.environ.get(_ENV_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "device_profiles"


def profile_names() -> list[str]:
    """The profiles available by name.

    Returns:
        Sorted stems of the ``*.toml`` files in :func:`profile_dir` (empty when it does not exist).
    """
    folder = profile_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.toml") if p.is_file())


# --- validation --------------------------------------------------------------------------------

_TOP_KEYS = ("name", "kind", "hardware", "day", "platform", "variation")
_KINDS = ("phone", "board")
_DAY_KEYS = ("source", "usage", "charging", "start_battery_frac", "learn_steps_per_usage_hour")


@dataclass(frozen=True)
class _Range:
    low: float
    low_open: bool
    high: float
    unit: str
    integer: bool = False

    def ok(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        return above and x <= self.high

    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        left = "(" if self.low_open else "["
        return f"{kind} in {left}{_fmt(self.low)}, {_fmt(self.high)}] {self.unit}".rstrip()


def _fmt(x: float) -> str:
    """A number as written in a profile: ``8192`` rather than ``8192.0`` or ``8.192e+03``."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


_HARDWARE: dict[str, _Range] = {
    "cores": _Range(1, False, 256, "(threads)", integer=True),
    "memory_mb": _Range(0, True, 1_048_576, "MiB"),
    "memory_budget_mb": _Range(0, True, 1_048_576, "MiB, at most memory_mb"),
    "battery_wh": _Range(0, False, 200, "Wh (0 for mains power)"),
    "power_use_w": _Range(0, False, 100, "W"),
    "power_idle_w": _Range(0, False, 100, "W"),
    "power_active_w": _Range(0, True, 100, "W"),
    "charge_w": _Range(0, False, 300, "W"),
    "relative_speed": _Range(0, True, 1000, "(x the reference machine)"),
}


_PLATFORM: dict[str, _Range] = {
    "max_runtime_s": _Range(0, False, 86400, "s (0: no cap)"),
    "start_delay_max_s": _Range(0, False, 86400, "s"),
    "skip_probability": _Range(0, False, 1, "(a probability)"),
    "interruptions_per_hour": _Range(0, False, 60, "per hour"),
    "kill_probability": _Range(0, False, 1, "(a probability)"),
}

_VARIATION: dict[str, _Range] = {
    "shift_sd_min": _Range(0, False, 240, "minutes"),
    "missed_charge_probability": _Range(0, False, 1, "(a probability)"),
    "topup_probability": _Range(0, False, 1, "(a probability)"),
    "topup_min": _Range(0, False, 540, "minutes"),
}
_SOURCED_TABLES = {"hardware": _HARDWARE, "platform": _PLATFORM, "variation": _VARIATION}


def _number(x: object) -> float | None:
    """``x`` as a float when it is a finite int or float (not a bool), else ``None``."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _unknown_keys(problems: list[str], where: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in table:
        if key in known:
            continue
        dotted = f"{where}.{key}" if where else key
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"rename it to {close[0]!r}" if close else "remove it"
        problems.append(f"{dotted}: unknown key; expected one of {', '.join(known)}. Fix: {hint}")


def _hardware_field(problems: list[str], name: str, entry: object, table: str = "hardware") -> tuple[float, str] | None:
    dotted = f"{table}.{name}"
    spec = _SOURCED_TABLES[table][name]
    example = f'{name} = {{ value = <number>, source = "<spec sheet, or estimate: reasoning>" }}'
    if not isinstance(entry, dict):
        problems.append(f"{dotted} = {entry!r}: expected an inline table {{value, source}}. Fix: write `{example}`")
        return None
    _unknown_keys(problems, dotted, entry, ("value", "source"))
    value, source = entry.get("value"), entry.get("source")
    number = _number(value)
    good = True
    if "value" not in entry:
        problems.append(f"{dotted}.value is missing: expected {spec.text()}. Fix: write `{example}`")
        good = False
    elif number is None or (spec.integer and not isinstance(value, int)):
        problems.append(f"{dotted} = {value!r}: expected {spec.text()}. Fix: write a bare number, not a string or bool")
        good = False
    elif not spec.ok(number):
        problems.append(f"{dotted} = {value!r}: expected {spec.text()}. Fix: correct the value (check its unit)")
        good = False
    if not isinstance(source, str) or not source.strip():
        shown = "missing" if "source" not in entry else repr(source)
        problems.append(
            f"{dotted}.source = {shown}: expected a non-empty string naming where the number comes from. "
            'Fix: add source = "<spec sheet>" or source = "estimate: <reasoning>"'
        )
        good = False
    if not good or number is None:
        return None
    return number, str(source)


def _windows(problems: list[str], dotted: str, raw: object, *, allow_empty: bool) -> tuple[tuple[float, float], ...]:
    fix_shape = f"write `{dotted.split('.')[-1]} = [[start, end], ...]` in hours, 0 <= start < end <= 24"
    if not isinstance(raw, list):
        problems.append(f"{dotted} = {raw!r}: expected a list of [start, end] pairs. Fix: {fix_shape}")
        return ()
    if not raw and not allow_empty:
        problems.append(f"{dotted} = []: expected at least one [start, end] window. Fix: {fix_shape}")
        return ()
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(raw):
        here = f"{dotted}[{i}]"
        bounds = [_number(x) for x in pair] if isinstance(pair, list) else []
        start, end = (bounds[0], bounds[1]) if len(bounds) == 2 else (None, None)
        if start is None or end is None:
            problems.append(f"{here} = {pair!r}: expected a pair [start, end] of numbers. Fix: {fix_shape}")
            continue
        if not 0.0 <= start < end <= _HOURS_PER_DAY:
            problems.append(f"{here} = {pair!r}: expected 0 <= start < end <= 24. Fix: {fix_shape}")
            continue
        if out and start < out[-1][0]:
            problems.append(
                f"{here} = {pair!r}: expected windows sorted by start; it starts before "
                f"{list(out[-1])!r}. Fix: sort the windows by start"
            )
        elif out and start < out[-1][1]:
            problems.append(
                f"{here} = {pair!r}: overlaps {list(out[-1])!r}; expected non-overlapping windows "
                "(touching ends are fine). Fix: merge the two windows or move one"
            )
        out.append((start, end))
    return tuple(out)


def _parse(path: Path, data: dict[str, Any]) -> DeviceProfile:
    problems: list[str] = []
    _unknown_keys(problems, "", data, _TOP_KEYS)

    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        shown = "missing" if "name" not in data else repr(name)
        problems.append(f'name = {shown}: expected a non-empty string. Fix: add name = "<device display name>"')
    kind = data.get("kind")
    if kind not in _KINDS:
        shown = "missing" if "kind" not in data else repr(kind)
        problems.append(f'kind = {shown}: expected "phone" or "board". Fix: set kind = "phone" or kind = "board"')

    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    hardware = data.get("hardware")
    if not isinstance(hardware, dict):
        shown = "missing" if "hardware" not in data else repr(hardware)
        problems.append(f"hardware = {shown}: expected a [hardware] table. Fix: add [hardware] with {', '.join(_HARDWARE)}")
    else:
        _unknown_keys(problems, "hardware", hardware, tuple(_HARDWARE))
        for key, spec in _HARDWARE.items():
            if key not in hardware:
                problems.append(
                    f"hardware.{key} is missing: expected {{value = {spec.text()}, source = \"...\"}}. "
                    f'Fix: add `{key} = {{ value = <number>, source = "<spec sheet, or estimate: reasoning>" }}`'
                )
                continue
            got = _hardware_field(problems, key, hardware[key])
            if got is not None:
                values[key], sources[key] = got
        memory, budget = values.get("memory_mb"), values.get("memory_budget_mb")
        if memory is not None and budget is not None and budget > memory:
            problems.append(
                f"hardware.memory_budget_mb = {_fmt(budget)}: expected at most hardware.memory_mb = {_fmt(memory)} MiB. "
                "Fix: lower the budget (it is what the app may use) or correct memory_mb"
            )
        battery, charge = values.get("battery_wh"), values.get("charge_w")
        if battery is not None and charge is not None and battery > 0 and charge <= 0:
            problems.append(
                f"hardware.charge_w = {_fmt(charge)}: expected > 0 because hardware.battery_wh = {_fmt(battery)} > 0. "
                "Fix: give the charging power, or set battery_wh = 0 for a mains-powered device"
            )

    day_table = data.get("day")
    day: DayPlan | None = None
    if not isinstance(day_table, dict):
        shown = "missing" if "day" not in data else repr(day_table)
        problems.append(f"day = {shown}: expected a [day] table. Fix: add [day] with {', '.join(_DAY_KEYS)}")
    else:
        n_before = len(problems)
        _unknown_keys(problems, "day", day_table, _DAY_KEYS)
        for key in _DAY_KEYS:
            if key not in day_table:
                problems.append(f"day.{key} is missing: expected it in [day]. Fix: add `{key} = ...` (see the schema)")
        day_source = day_table.get("source")
        if "source" in day_table and (not isinstance(day_source, str) or not day_source.strip()):
            problems.append(
                f"day.source = {day_source!r}: expected a non-empty string. "
                'Fix: name the trace or study, or write "estimate: <reasoning>"'
            )
        usage = _windows(problems, "day.usage", day_table["usage"], allow_empty=False) if "usage" in day_table else ()
        charging = (
            _windows(problems, "day.charging", day_table["charging"], allow_empty=True) if "charging" in day_table else ()
        )
        frac_raw = day_table.get("start_battery_frac")
        frac = _number(frac_raw)
        if "start_battery_frac" in day_table and not (frac is not None and 0.0 < frac <= 1.0):
            problems.append(
                f"day.start_battery_frac = {frac_raw!r}: expected a number in (0, 1]. "
                "Fix: give the battery fraction at midnight (1.0 for a mains-powered board)"
            )
        steps_raw = day_table.get("learn_steps_per_usage_hour")
        steps = _number(steps_raw)
        if "learn_steps_per_usage_hour" in day_table and not (steps is not None and steps >= 0):
            problems.append(
                f"day.learn_steps_per_usage_hour = {steps_raw!r}: expected a number >= 0. "
                "Fix: give the wake steps the app learns per hour of use"
            )
        if len(problems) == n_before and frac is not None and steps is not None:
            day = DayPlan(
                usage=usage,
                charging=charging,
                start_battery_frac=frac,
                learn_steps_per_usage_hour=steps,
                source=str(day_source),
            )
            sources["day"] = str(day_source)

    platform_rules = _optional_table(problems, sources, data, "platform", "platform docs")
    platform = None if platform_rules is None else PlatformRules(**platform_rules)
    varied = _optional_table(problems, sources, data, "variation", "a study of traces")
    variation = None if varied is None else DayVariation(**varied)

    if problems or day is None:
        raise ProfileError(path, problems)
    return DeviceProfile(
        key=path.stem,
        name=str(name),
        kind=str(kind),
        cores=int(values["cores"]),
        memory_mb=values["memory_mb"],
        memory_budget_mb=values["memory_budget_mb"],
        battery_wh=values["battery_wh"],
        power_use_w=values["power_use_w"],
        power_idle_w=values["power_idle_w"],
        power_active_w=values["power_active_w"],
        charge_w=values["charge_w"],
        relative_speed=values["relative_speed"],
        day=day,
        sources=sources,
        path=path,
        platform=platform,
        variation=variation,
    )


def _optional_table(problems: list[str], sources: dict[str, str], data: dict[str, Any], table: str,
                    where: str) -> dict[str, float] | None:
    """An optional table of sourced numbers (``[platform]``, ``[variation]``): its values, or ``None``."""
    specs = _SOURCED_TABLES[table]
    raw = data.get(table)
    if table in data and not isinstance(raw, dict):
        problems.append(f"{table} = {raw!r}: expected a [{table}] table. Fix: add [{table}] with "
                        f"{', '.join(specs)}, or remove it")
        return None
    if not isinstance(raw, dict):
        return None
    _unknown_keys(problems, table, raw, tuple(specs))
    values: dict[str, float] = {}
    for key, spec in specs.items():
        if key not in raw:
            problems.append(f"{table}.{key} is missing: expected {{value = {spec.text()}, source = \"...\"}}. "
                            f'Fix: add `{key} = {{ value = <number>, source = "<{where}, or estimate: ..>" }}`')
            continue
        got = _hardware_field(problems, key, raw[key], table)
        if got is not None:
            values[key], sources[f"{table}.{key}"] = got
    return values if len(values) == len(specs) else None


def _resolve(name_or_path: str | Path) -> Path:
    given = Path(name_or_path)
    is_name = given.suffix != ".toml" and len(given.parts) == 1
    if not is_name:
        if not given.is_file():
            raise ProfileError(
                given,
                [f"path = {str(given)!r}: no such file; expected an existing .toml profile. "
                 f"Fix: check the path, or pass a name from {profile_dir()} ({', '.join(profile_names()) or 'none'})"],
            )
        if given.suffix != ".toml":
            raise ProfileError(
                given,
                [f"path = {str(given)!r}: expected a .toml file. Fix: pass a profile's .toml file or its name"],
            )
        return given
    folder = profile_dir()
    candidate = folder / f"{given.name}.toml"
    if not candidate.is_file():
        names = profile_names()
        where = f"{folder} (set ${_ENV_DIR} to look elsewhere)"
        raise ProfileError(
            candidate,
            [f"name = {given.name!r}: no such profile in {where}; expected one of: "
             f"{', '.join(names) or '(none: the folder has no .toml files)'}. "
             "Fix: pass one of these names, or a path to a .toml file"],
        )
    return candidate


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Read and validate one device profile.

    Args:
        name_or_path: a profile's name (the stem of a file in :func:`profile_dir`, e.g.
            ``"galaxy-s24"``) or the path of a ``.toml`` file.

    Returns:
        The validated profile; ``key`` is the file's stem, ``sources`` maps each hardware field
        (and ``"day"``) to where its number comes from.

    Raises:
        ProfileError: the name is unknown (the message lists the available names), the file is
            missing, unreadable or not valid TOML, or any field is missing, mistyped, out of
            range or unknown (every problem of the file in one message, each with its dotted
            field name).

    Example:
        >>> import tempfile
        >>> text = '''
        ... name = "Toy board"
        ... kind = "board"
        ... [hardware]
        ... cores = { value = 4, source = "spec" }
        ... memory_mb = { value = 1024, source = "spec" }
        ... memory_budget_mb = { value = 256, source = "estimate: a quarter" }
        ... battery_wh = { value = 0, source = "mains powered" }
        ... power_use_w = { value = 2.0, source = "estimate" }
        ... power_idle_w = { value = 1.5, source = "estimate" }
        ... power_active_w = { value = 2.5, source = "estimate" }
        ... charge_w = { value = 0, source = "mains powered" }
        ... relative_speed = { value = 0.5, source = "estimate" }
        ... [day]
        ... source = "estimate: opening hours"
        ... usage = [[9.0, 17.0]]
        ... charging = [[0.0, 24.0]]
        ... start_battery_frac = 1.0
        ... learn_steps_per_usage_hour = 40
        ... '''
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "toy-board.toml"
        ...     _ = path.write_text(text, encoding="utf-8")
        ...     profile = load_profile(path)
        >>> profile.key, profile.cores, profile.has_battery, profile.day.usage_hours()
        ('toy-board', 4, False, 8.0)
    """
    path = _resolve(name_or_path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ProfileError(path, [f"file: cannot be read ({exc}). Fix: check the path and its permissions"]) from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(path, [f"file: not UTF-8 ({exc}). Fix: save the file as UTF-8"]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(path, [f"file: invalid TOML: {exc}. Fix: correct the syntax there"]) from None
    return _parse(path.resolve(), data)
