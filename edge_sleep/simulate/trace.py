"""A CSV trace of battery, charging and screen events, folded into a typical day.

The trace is what a phone exports (or a Linux ``upower`` log converted to CSV): a header, then one
row per event. Stages, each a pure function:

1. :func:`read_trace`: the CSV file -> a list of :class:`TraceEvent` (every cell checked; a bad
   one raises :class:`TraceError` naming the file, line, column, value, what was expected and
   the fix).
2. :func:`day_from_events`: the events -> a :class:`~edge_sleep.simulate.profiles.DayPlan`
   (state carried forward between events, every covered day folded onto a 24 h clock, a slot
   kept when it holds in at least half of the days that cover it).
3. :func:`day_to_toml`: the plan -> the ``[day]`` table of a device profile.

:func:`day_from_trace` runs 1 and 2 on a file and names the file, the number of days and the
date range in ``DayPlan.source`` (:func:`describe_trace`); ``tools/day_from_trace.py`` is the
command line around it.

:func:`days_from_events` / :func:`days_from_trace` keep each whole calendar day of the trace as its
own plan instead of folding them (a missed overnight charge or a daytime top-up stays in its day):
``edge-sleep simulate --trace FILE --tz ZONE`` replays them day by day.
"""

from __future__ import annotations

import bisect
import csv
import math
import statistics
import tomllib  # noqa: F401  (used by the doctest of day_to_toml)
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import TypeVar

from edge_sleep.errors import ConfigError, EdgeSleepError
from edge_sleep.simulate.profiles import DayPlan

_Built = TypeVar("_Built")

__all__ = [
    "TraceError",
    "TraceEvent",
    "read_trace",
    "parse_charging",
    "parse_screen",
    "day_from_events",
    "day_from_trace",
    "days_from_events",
    "days_from_trace",
    "describe_trace",
    "day_to_toml",
]

DAY_S = 86_400.0
MIN_COVERAGE_S = 3_600.0
_EPOCH = datetime(1970, 1, 1)
_MAX_UNIX_S = 1e11  # year ~5138; bigger numbers are almost surely milliseconds

_CHARGING_TOKENS: dict[str, bool] = {
    "true": True, "1": True, "yes": True, "charging": True, "full": True,
    "fully-charged": True, "pending-charge": True,  # upower's names for "on the charger"
    "false": False, "0": False, "no": False, "discharging": False, "pending-discharge": False,
}
_SCREEN_TOKENS: dict[str, bool] = {
    "on": True, "1": True, "true": True, "yes": True,
    "off": False, "0": False, "false": False, "no": False,
}
_STATE_COLUMNS = ("battery", "charging", "screen")


class TraceError(EdgeSleepError, ValueError):
    """A trace file (or a list of events) cannot be turned into a day.

    The message names the file, the line, the column, the bad value, what was expected and the
    fix, as far as each applies; the same pieces are kept as attributes.

    Args:
        problem: what is wrong, in a few words.
        path: the trace file, when known.
        line: the 1-based line number in the file, when the problem is on one line.
        column: the column's name, when the problem is in one column.
        value: the offending value, as written.
        expected: what would have been accepted.
        fix: how to mend the trace.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: Path | str | None = None,
        line: int | None = None,
        column: str | None = None,
        value: str | None = None,
        expected: str = "",
        fix: str = "",
    ) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.line = line
        self.column = column
        self.value = value
        self.expected = expected
        self.fix = fix
        where = [f"trace {str(self.path)!r}" if self.path is not None else "trace"]
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        message = f"{', '.join(where)}: {problem}"
        if value is not None:
            message += f" (got {value!r})"
        if expected:
            message += f"; expected {expected}"
        message += "."
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)

    def with_path(self, path: Path | str) -> TraceError:
        """The same error, naming ``path`` as the trace file.

        Args:
            path: the trace file the events came from.

        Returns:
            A new :class:`TraceError` with every other field unchanged.
        """
        return TraceError(self.problem, path=path, line=self.line, column=self.column,
                          value=self.value, expected=self.expected, fix=self.fix)


@dataclass(frozen=True)
class TraceEvent:
    """One row of a trace. ``None`` means "no change in this event".

    Attributes:
        time_s: seconds since 1970-01-01 00:00 on the trace's own wall clock (the time as
            written, any UTC offset ignored, so ``time_s % 86400`` is the time of day there).
        battery_frac: battery level as a fraction in ``[0, 1]``.
        charging: whether the device is on the charger.
        screen_on: whether the screen is on.
    """

    time_s: float
    battery_frac: float | None = None
    charging: bool | None = None
    screen_on: bool | None = None


def _lookup_token(token: str, table: dict[str, bool], what: str) -> bool | None:
    """``table``'s value for the cell (any case, spaces ignored); ``None`` for an empty cell."""
    key = token.strip().lower()
    if not key:
        return None
    if key not in table:
        raise ValueError(f"unknown {what} token {token!r}")
    return table[key]


def parse_charging(token: str) -> bool | None:
    """One ``charging`` cell -> on the charger or not; ``None`` for an empty cell.

    Accepts (any case) ``true/false``, ``1/0``, ``yes/no``, ``charging/discharging``, ``full``
    (on the charger), and upower's ``fully-charged``, ``pending-charge``, ``pending-discharge``.

    Args:
        token: the cell as written.

    Returns:
        ``True`` on the charger, ``False`` off it, ``None`` for an empty cell.

    Raises:
        ValueError: the token is none of the above.

    Examples:
        >>> parse_charging("Full"), parse_charging("discharging"), parse_charging(" ")
        (True, False, None)
    """
    return _lookup_token(token, _CHARGING_TOKENS, "charging")


def parse_screen(token: str) -> bool | None:
    """One ``screen`` cell -> on or off; ``None`` for an empty cell.

    Accepts (any case) ``on/off``, ``1/0``, ``true/false``, ``yes/no``.

    Args:
        token: the cell as written.

    Returns:
        ``True`` for on, ``False`` for off, ``None`` for an empty cell.

    Raises:
        ValueError: the token is none of the above.

    Examples:
        >>> parse_screen("ON"), parse_screen("0"), parse_screen("")
        (True, False, None)
    """
    return _lookup_token(token, _SCREEN_TOKENS, "screen")


def parse_tz(name: str) -> tzinfo:
    """A time zone: ``"UTC"``, a fixed offset (``"+05:30"``, ``"-08:00"``) or an IANA name
    (``"America/Los_Angeles"``, read from the system's zone database).

    Raises:
        ConfigError: a name that is none of these.
    """
    text = name.strip()
    if text.upper() in ("UTC", "Z"):
        return timezone.utc
    if text[:1] in "+-" and len(text) == 6 and text[3] == ":" and text[1:3].isdigit() and text[4:].isdigit():
        sign = 1 if text[0] == "+" else -1
        return timezone(sign * timedelta(hours=int(text[1:3]), minutes=int(text[4:])))
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(text)
    except (ValueError, OSError, ImportError) as e:  # ZoneInfoNotFoundError is a KeyError subclass on some versions
        raise ConfigError("tz", [f"tz={name!r} ({type(e).__name__}); expected 'UTC', an offset like '-08:00', or a "
                                 "zone name like 'America/Los_Angeles' that this system's zone database holds"]) from None
    except KeyError:
        raise ConfigError("tz", [f"tz={name!r}; expected 'UTC', an offset like '-08:00', or a zone name like "
                                 "'America/Los_Angeles' that this system's zone database holds"]) from None


def _parse_time(cell: str, path: Path, line: int, tz: tzinfo | None = None) -> float:
    """A ``time`` cell (ISO 8601 or unix seconds) -> wall-clock seconds since the epoch, on the
    trace's wall clock: unix seconds (and stamps with an offset) converted to ``tz``."""
    text = cell.strip()
    expected = "an ISO 8601 time like '2026-11-20T07:15:00' (an offset is allowed) or unix seconds"
    if not text:
        raise TraceError("the time is empty", path=path, line=line, column="time", value=cell,
                         expected=expected, fix=f"give line {line} a time, or delete the line.")
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or not 0.0 <= number < _MAX_UNIX_S:
            hint = " (a number this big looks like milliseconds: divide by 1000)" if (
                math.isfinite(number) and number >= _MAX_UNIX_S) else ""
            raise TraceError("unix time out of range", path=path, line=line, column="time",
                             value=cell, expected=f"unix seconds in [0, {_MAX_UNIX_S:g})",
                             fix=f"write the time on line {line} in seconds{hint}.")
        if tz is None:  # unix seconds carry no wall clock: the hour of day needs the device's zone
            raise TraceError("unix seconds carry no time zone", path=path, line=line, column="time", value=cell,
                             expected="the device's time zone, to know the hour of day",
                             fix="pass tz (--tz America/Los_Angeles, --tz=-08:00, or --tz UTC if the device "
                                 "ran on UTC).")
        stamp = datetime.fromtimestamp(number, tz)
        return (stamp.replace(tzinfo=None) - _EPOCH).total_seconds()
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise TraceError("the time cannot be read", path=path, line=line, column="time",
                         value=cell, expected=expected,
                         fix=f"write the time on line {line} as e.g. 2026-11-20T07:15:00.") from None
    if tz is not None and stamp.tzinfo is not None:
        stamp = stamp.astimezone(tz)
    return (stamp.replace(tzinfo=None) - _EPOCH).total_seconds()


def _parse_battery(cell: str, path: Path, line: int) -> tuple[float, bool] | None:
    """A ``battery`` cell -> (value as written, written with '%'), or ``None`` if empty."""
    text = cell.strip()
    if not text:
        return None
    percent_sign = text.endswith("%")
    try:
        value = float(text.rstrip("%").strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise TraceError("battery level out of range", path=path, line=line, column="battery",
                         value=cell, expected="a fraction in [0, 1] or a percent in [0, 100]",
                         fix=f"correct the battery level on line {line}, or leave the cell empty.")
    return value, percent_sign


def read_trace(path: Path, *, tz: str | None = None) -> list[TraceEvent]:
    """Read a CSV trace of battery, charging and screen events.

    The first line is a header (names in any case; unknown columns are ignored). Columns:

    - ``time`` (required): ISO 8601 (``2026-11-20T07:15:00``, optionally with an offset: without
      ``tz`` the wall-clock time as written is kept, with ``tz`` it is converted to that zone) or
      unix seconds (which need ``tz``: they carry no hour of day).
    - ``battery``: a fraction in ``[0, 1]``, or a percent in ``[0, 100]`` (a trailing ``%`` is
      allowed); a file is read as percent when any value is above 1 or has a ``%``.
    - ``charging``: see :func:`parse_charging`.
    - ``screen``: see :func:`parse_screen`.

    At least one of ``battery``, ``charging``, ``screen`` must be present. An empty cell means
    "no change in this event". Rows must be in non-decreasing time order; blank lines are
    skipped.

    Args:
        path: the CSV file (UTF-8, a byte-order mark allowed).
        tz: the device's time zone (:func:`parse_tz`).

    Returns:
        The events in file order (at least one).

    Raises:
        TraceError: a missing column, an unreadable cell, a row out of time order, a row with
            more cells than the header, or no rows at all.
        OSError: the file cannot be read.
    """
    path = Path(path)
    zone = None if tz is None else parse_tz(tz)
    try:
        return _read_rows(path, zone)
    except UnicodeDecodeError as error:
        raise TraceError("the file is not UTF-8 text", path=path,
                         value=f"byte 0x{error.object[error.start]:02x} at offset {error.start}",
                         expected="a UTF-8 CSV file",
                         fix="save the trace as UTF-8 CSV.") from None


def _read_rows(path: Path, tz: tzinfo | None) -> list[TraceEvent]:
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        for row in reader:
            if any(cell.strip() for cell in row):
                header = [cell.strip().lower() for cell in row]
                header_line = reader.line_num
                break
        if header is None:
            raise TraceError("the file is empty", path=path, line=1,
                             expected="a header line such as 'time,battery,charging,screen'",
                             fix="export the trace again with a header and at least one row.")
        columns: dict[str, int] = {}
        for index, name in enumerate(header):
            if name in ("time", *_STATE_COLUMNS):
                if name in columns:
                    raise TraceError("a column appears twice", path=path, line=header_line,
                                     column=name, expected="each column once",
                                     fix=f"rename or delete one of the {name!r} columns.")
                columns[name] = index
        if "time" not in columns:
            raise TraceError("there is no time column", path=path, line=header_line,
                             column="time", value=",".join(header),
                             expected="a header with a 'time' column",
                             fix="name the column of timestamps 'time' in the header.")
        if not any(name in columns for name in _STATE_COLUMNS):
            raise TraceError("there is no state column", path=path, line=header_line,
                             value=",".join(header),
                             expected="at least one of the columns 'battery', 'charging', 'screen'",
                             fix="add (or rename to) a battery, charging or screen column.")

        raw: list[tuple[int, float, tuple[float, bool] | None, bool | None, bool | None]] = []
        previous: tuple[int, float, str] | None = None
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise TraceError("the row has more cells than the header", path=path, line=line,
                                 value=f"{len(row)} cells",
                                 expected=f"at most {len(header)} cells",
                                 fix=f"quote cells that contain commas on line {line}, or add "
                                     "the missing column names to the header.")

            def cell(name: str, row: list[str] = row) -> str:
                index = columns.get(name)
                return row[index] if index is not None and index < len(row) else ""

            time_s = _parse_time(cell("time"), path, line, tz)
            if previous is not None and time_s < previous[1]:
                raise TraceError("the row is earlier than the row before it", path=path,
                                 line=line, column="time", value=cell("time"),
                                 expected=f"a time at or after {previous[2]!r} (line {previous[0]})",
                                 fix="sort the rows by time (e.g. `sort -t, -k1,1` after the "
                                     "header), or correct the clock on this line.")
            previous = (line, time_s, cell("time").strip())
            battery = _parse_battery(cell("battery"), path, line)
            try:
                charging = parse_charging(cell("charging"))
            except ValueError:
                raise TraceError("the charging state cannot be read", path=path, line=line,
                                 column="charging", value=cell("charging"),
                                 expected="one of " + "/".join(_CHARGING_TOKENS) + " or empty",
                                 fix=f"write the charging state on line {line} as one of these, "
                                     "or leave the cell empty.") from None
            try:
                screen = parse_screen(cell("screen"))
            except ValueError:
                raise TraceError("the screen state cannot be read", path=path, line=line,
                                 column="screen", value=cell("screen"),
                                 expected="one of " + "/".join(_SCREEN_TOKENS) + " or empty",
                                 fix=f"write the screen state on line {line} as one of these, "
                                     "or leave the cell empty.") from None
            raw.append((line, time_s, battery, charging, screen))

    if not raw:
        raise TraceError("the file has a header but no rows", path=path, line=header_line,
                         expected="at least one event row",
                         fix="export a trace that covers at least an hour.")
    percent = any(b is not None and (b[0] > 1.0 or b[1]) for _, _, b, _, _ in raw)
    scale = 100.0 if percent else 1.0
    return [
        TraceEvent(time_s=time_s, battery_frac=None if battery is None else battery[0] / scale,
                   charging=charging, screen_on=screen)
        for _, time_s, battery, charging, screen in raw
    ]


def _day_index(time_s: float) -> int:
    return math.floor(time_s / DAY_S)


def _date_text(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).date().isoformat()


def _covered_days(events: Sequence[TraceEvent]) -> range:
    """Day indices (days since 1970-01-01) that the span ``[first, last)`` touches."""
    first, last = events[0].time_s, events[-1].time_s
    end = max(math.ceil(last / DAY_S), _day_index(first) + 1)
    return range(_day_index(first), end)


def _slots_to_windows(flags: Sequence[bool], resolution_min: int) -> tuple[tuple[float, float], ...]:
    """Runs of true slots -> sorted ``[start, end)`` windows in hours, rounded to 4 decimals."""
    windows: list[tuple[float, float]] = []
    start: int | None = None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            windows.append((round(start * resolution_min / 60.0, 4),
                            round(index * resolution_min / 60.0, 4)))
            start = None
    return tuple(windows)


def day_from_events(
    events: Sequence[TraceEvent],
    *,
    learn_steps_per_usage_hour: float = 40.0,
    resolution_min: int = 5,
    source: str,
) -> DayPlan:
    """Fold a trace's events into a typical day.

    1. State over time: each of battery, charging and screen carries forward from the last event
       that set it; before its first value the screen is off and the device not charging. The
       trace covers ``[first event, last event)``.
    2. Every covered day is cut into ``resolution_min``-minute slots; a slot's state on a day is
       the state at the slot's midpoint (so a change is rounded to the nearest slot edge), and a
       day covers the slot when the midpoint lies in the trace.
    3. A slot is usage (screen on) or charging when it is so in at least half of the days that
       cover it; runs of such slots become ``[start, end)`` windows in hours. A trace without
       screen values has no usage.
    4. ``start_battery_frac``: the median, over the midnights in the trace, of the battery level
       at the first event at or after each midnight (carried forward); the first battery value
       when no midnight is covered (or none has a level yet); 1.0 without battery values.
       Clamped into ``[0.01, 1]`` and rounded to 4 decimals.

    Args:
        events: events in non-decreasing time order, as :func:`read_trace` returns them.
        learn_steps_per_usage_hour: copied into the plan.
        resolution_min: slot length in minutes; must divide 1440 and be at most 60.
        source: copied into ``DayPlan.source``.

    Returns:
        The typical day.

    Raises:
        ConfigError: ``resolution_min`` or ``learn_steps_per_usage_hour`` is out of range.
        TraceError: no events, events out of time order, or a trace shorter than 1 hour.
    """
    problems = []
    if isinstance(resolution_min, bool) or not isinstance(resolution_min, int) or not (
            1 <= resolution_min <= 60 and 1440 % resolution_min == 0):
        problems.append(f"resolution_min={resolution_min!r}; expected an int in [1, 60] that "
                        "divides 1440 (e.g. 1, 5, 10, 15, 30, 60). Fix: pick one of those.")
    if not (math.isfinite(learn_steps_per_usage_hour) and learn_steps_per_usage_hour >= 0):
        problems.append(f"learn_steps_per_usage_hour={learn_steps_per_usage_hour!r}; expected a "
                        "finite number >= 0. Fix: pass the app's wake steps per hour of use.")
    if problems:
        raise ConfigError("day_from_events", problems)
    if not events:
        raise TraceError("there are no events", column="time", expected="at least 1 hour of events",
                         fix="pass the events of a trace that covers a day or more.")
    times = [event.time_s for event in events]
    for index in range(1, len(times)):
        if times[index] < times[index - 1]:
            raise TraceError(f"event {index} is earlier than event {index - 1}", column="time",
                             value=f"{times[index]} < {times[index - 1]}",
                             expected="events in non-decreasing time order",
                             fix="sort the events by time_s.")
    first, last = times[0], times[-1]
    if last - first < MIN_COVERAGE_S:
        raise TraceError("the trace covers less than 1 hour", column="time",
                         value=f"{(last - first) / 60.0:.1f} min",
                         expected=f"at least {MIN_COVERAGE_S / 60.0:.0f} min from the first "
                                  "to the last event",
                         fix="record a longer trace (a day or more gives a typical day).")

    screen_state, charging_state, battery_state = _carried(events)

    slots = 1440 // resolution_min
    slot_s = resolution_min * 60.0
    covered = [0] * slots
    usage_days = [0] * slots
    charging_days = [0] * slots
    for day in _covered_days(events):
        for slot in range(slots):
            mid = day * DAY_S + (slot + 0.5) * slot_s
            if not first <= mid < last:
                continue
            index = bisect.bisect_right(times, mid) - 1
            covered[slot] += 1
            usage_days[slot] += screen_state[index]
            charging_days[slot] += charging_state[index]

    has_screen = any(event.screen_on is not None for event in events)
    usage_flags = [has_screen and n > 0 and 2 * u >= n for u, n in zip(usage_days, covered)]
    charging_flags = [n > 0 and 2 * c >= n for c, n in zip(charging_days, covered)]

    at_midnight: list[float] = []
    for day in range(math.ceil(first / DAY_S), _day_index(last) + 1):
        index = bisect.bisect_left(times, day * DAY_S)
        if index < len(times):
            index = bisect.bisect_right(times, times[index]) - 1  # all events at that instant
            level = battery_state[index]
            if level is not None:
                at_midnight.append(level)
    levels = [e.battery_frac for e in events if e.battery_frac is not None]
    if at_midnight:
        start_frac = float(statistics.median(at_midnight))
    elif levels:
        start_frac = levels[0]
    else:
        start_frac = 1.0
    start_frac = round(min(1.0, max(0.01, start_frac)), 4)

    return DayPlan(
        usage=_slots_to_windows(usage_flags, resolution_min),
        charging=_slots_to_windows(charging_flags, resolution_min),
        start_battery_frac=start_frac,
        learn_steps_per_usage_hour=float(learn_steps_per_usage_hour),
        source=source,
    )


def _carried(events: Sequence[TraceEvent]) -> tuple[list[bool], list[bool], list[float | None]]:
    """Screen, charging and battery after each event, carried forward (lists parallel to ``events``)."""
    screen_state: list[bool] = []
    charging_state: list[bool] = []
    battery_state: list[float | None] = []
    screen, charging = False, False
    battery: float | None = None
    for event in events:
        screen = event.screen_on if event.screen_on is not None else screen
        charging = event.charging if event.charging is not None else charging
        battery = event.battery_frac if event.battery_frac is not None else battery
        screen_state.append(screen)
        charging_state.append(charging)
        battery_state.append(battery)
    return screen_state, charging_state, battery_state


def days_from_events(
    events: Sequence[TraceEvent],
    *,
    learn_steps_per_usage_hour: float = 40.0,
    resolution_min: int = 5,
    name: str = "trace",
) -> list[DayPlan]:
    """Each whole calendar day of a trace as its own plan, in order (nothing folded or voted).

    A day counts when the trace covers all of it (from its midnight to the next); the partial
    first and last days are left out. Within a day, a slot's state is the carried-forward state at
    its midpoint (as in :func:`day_from_events`); ``start_battery_frac`` is the battery level at
    the day's midnight (carried forward; 1.0 before any battery value), clamped into ``[0.01, 1]``.

    Args:
        events: events in non-decreasing time order, as :func:`read_trace` returns them.
        learn_steps_per_usage_hour: copied into each plan.
        resolution_min: slot length in minutes (see :func:`day_from_events`).
        name: the trace's name, for each plan's ``source`` (``"trace: NAME, 2026-11-20"``).

    Returns:
        One plan per whole day.

    Raises:
        TraceError: no events, events out of order, or no whole calendar day in the trace (the
            fix names :func:`day_from_trace`, which folds a shorter trace into a typical day).
        ConfigError: an argument is out of range.
    """
    day_from_events(events, learn_steps_per_usage_hour=learn_steps_per_usage_hour, resolution_min=resolution_min,
                    source="check")  # the same checks of the arguments and the events
    times = [event.time_s for event in events]
    first, last = times[0], times[-1]
    screen_state, charging_state, battery_state = _carried(events)
    has_screen = any(event.screen_on is not None for event in events)
    slots = 1440 // resolution_min
    slot_s = resolution_min * 60.0
    plans = []
    for day in _covered_days(events):
        if not (first <= day * DAY_S and (day + 1) * DAY_S <= last):
            continue
        usage, charging = [], []
        for slot in range(slots):
            index = bisect.bisect_right(times, day * DAY_S + (slot + 0.5) * slot_s) - 1
            usage.append(has_screen and screen_state[index])
            charging.append(charging_state[index])
        at = bisect.bisect_right(times, day * DAY_S) - 1
        level = battery_state[at] if at >= 0 else None
        plans.append(DayPlan(
            usage=_slots_to_windows(usage, resolution_min),
            charging=_slots_to_windows(charging, resolution_min),
            start_battery_frac=round(min(1.0, max(0.01, 1.0 if level is None else level)), 4),
            learn_steps_per_usage_hour=float(learn_steps_per_usage_hour),
            source=f"trace: {name}, {_date_text(day)}",
        ))
    if not plans:
        raise TraceError("the trace holds no whole calendar day", column="time",
                         value=f"{_date_text(_day_index(first))} to {_date_text(_day_index(last))}",
                         expected="events from before one midnight to after the next",
                         fix="record at least one whole day, or fold the trace into a typical day with "
                             "day_from_trace (tools/day_from_trace.py).")
    return plans


def days_from_trace(
    path: Path,
    *,
    learn_steps_per_usage_hour: float = 40.0,
    resolution_min: int = 5,
    tz: str | None = None,
) -> list[DayPlan]:
    """Read a trace file and keep each whole day of it (:func:`days_from_events`).

    Args:
        path: the CSV trace (see :func:`read_trace`).
        tz: the device's time zone (needed for unix seconds; see :func:`read_trace`).
        learn_steps_per_usage_hour, resolution_min: as :func:`days_from_events`.

    Raises:
        TraceError, ConfigError, OSError: as :func:`day_from_trace`.
    """
    return _from_file(path, tz, lambda events: days_from_events(
        events, learn_steps_per_usage_hour=learn_steps_per_usage_hour, resolution_min=resolution_min,
        name=Path(path).name))


def _from_file(path: Path, tz: str | None, build: Callable[[list[TraceEvent]], _Built]) -> _Built:
    """``build`` applied to the trace file's events; a :class:`TraceError` names the file."""
    events = read_trace(path, tz=tz)
    try:
        return build(events)
    except TraceError as error:
        raise error.with_path(path) from None


def describe_trace(path: Path, events: Sequence[TraceEvent]) -> str:
    """The ``source`` string of a day built from a trace file.

    Args:
        path: the trace file (only its name is used).
        events: its events (at least one), in time order.

    Returns:
        e.g. ``"trace: phone.csv (3 days, 2026-11-20 to 2026-11-22)"``; the days are the
        calendar days the trace touches.

    Raises:
        TraceError: ``events`` is empty.
    """
    if not events:
        raise TraceError("there are no events", path=path, expected="at least one event",
                         fix="pass the events read from the trace.")
    days = _covered_days(events)
    count = len(days)
    return (f"trace: {Path(path).name} ({count} day{'s' if count != 1 else ''}, "
            f"{_date_text(days[0])} to {_date_text(days[-1])})")


def day_from_trace(
    path: Path,
    *,
    learn_steps_per_usage_hour: float = 40.0,
    resolution_min: int = 5,
    tz: str | None = None,
) -> DayPlan:
    """Read a trace file and fold it into a typical day named after the file.

    Args:
        path: the CSV trace (see :func:`read_trace`).
        tz: the device's time zone (needed for unix seconds; see :func:`read_trace`).
        learn_steps_per_usage_hour: copied into the plan.
        resolution_min: slot length in minutes (see :func:`day_from_events`).

    Returns:
        The day, with ``source`` from :func:`describe_trace`.

    Raises:
        TraceError: the file or its events cannot make a day (the message names the file).
        ConfigError: an argument is out of range.
        OSError: the file cannot be read.
    """
    return _from_file(path, tz, lambda events: day_from_events(
        events, learn_steps_per_usage_hour=learn_steps_per_usage_hour, resolution_min=resolution_min,
        source=describe_trace(path, events)))


def day_to_toml(day: DayPlan) -> str:
    """A plan as the ``[day]`` table of a device profile.

    The writer is :meth:`DayPlan.to_toml`, so a profile written here reads back with
    :func:`~edge_sleep.simulate.profiles.load_profile`. Keys: ``source``, ``usage``,
    ``charging``, ``start_battery_frac``, ``learn_steps_per_usage_hour``.

    Args:
        day: the plan.

    Returns:
        TOML text, ending in a newline, that :mod:`tomllib` reads back to the same values.

    Examples:
        >>> plan = DayPlan(usage=((7.0, 7.75),), charging=((0.0, 6.5), (23.0, 24.0)),
        ...                start_battery_frac=0.6, learn_steps_per_usage_hour=40.0,
        ...                source="trace: phone.csv (3 days, 2026-11-20 to 2026-11-22)")
        >>> table = tomllib.loads(day_to_toml(plan))["day"]
        >>> table["usage"], table["charging"], table["start_battery_frac"]
        ([[7.0, 7.75]], [[0.0, 6.5], [23.0, 24.0]], 0.6)
    """
    return day.to_toml()
