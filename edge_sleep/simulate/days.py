"""Days that differ: the plans a simulation replays, one per simulated day.

A profile's ``[day]`` is a typical day. A simulation can replay it every day (``"typical"``), draw
each day from it with the profile's ``[variation]`` (``"drawn"``: :func:`draw_days`), or replay a
trace day by day (``"trace"``: :func:`edge_sleep.simulate.trace.days_from_trace`, cycled by
:func:`cycle_days` when the simulation is longer than the trace). Each function here is pure: the
same plan, variation and seed give the same days.

Example:
    >>> from edge_sleep.simulate.profiles import DayPlan, DayVariation
    >>> plan = DayPlan(usage=((7.0, 8.0),), charging=((0.0, 6.5), (23.0, 24.0)), start_battery_frac=0.6,
    ...                learn_steps_per_usage_hour=40.0, source="estimate: example")
    >>> days = draw_days(plan, DayVariation(missed_charge_probability=1.0), 2, seed=0)
    >>> days[0].charging  # no charge in its evening (its morning ends a night before the simulation)
    ((0.0, 6.5),)
    >>> days[1].charging  # nor in the next morning
    ()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from edge_sleep.errors import ConfigError
from edge_sleep.simulate.profiles import DayPlan, DayVariation

__all__ = ["DAYS_FROM", "cycle_days", "draw_days", "first_use_h", "normalize_windows"]

DAYS_FROM = ("typical", "drawn", "trace")
_SLOT_H = 5.0 / 60.0  # boundaries move in 5-minute steps, the simulator's resolution
_TOPUP_HOURS = (9.0, 18.0)  # a daytime top-up starts in this span


def normalize_windows(windows: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Clip to ``[0, 24]``, drop empty windows, sort, and merge windows that overlap or touch.

    >>> normalize_windows([(5.0, 6.0), (-1.0, 2.0), (1.5, 3.0), (7.0, 7.0)])
    ((0.0, 3.0), (5.0, 6.0))
    """
    clipped = sorted((max(0.0, float(a)), min(24.0, float(b))) for a, b in windows)
    out: list[tuple[float, float]] = []
    for start, end in clipped:
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return tuple((round(a, 4), round(b, 4)) for a, b in out)


def _shift(windows: Sequence[tuple[float, float]], sd_min: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Each boundary other than midnight moves by N(0, sd) minutes, rounded to 5 minutes."""
    def move(hour: float) -> float:
        if hour in (0.0, 24.0) or sd_min <= 0:
            return hour
        return min(24.0, max(0.0, hour + round(rng.normal(0.0, sd_min) / 5.0) * _SLOT_H))
    return [(move(a), move(b)) for a, b in windows]


def _overnight(charging: Sequence[tuple[float, float]]) -> tuple[list[int], list[int]]:
    """Indices of the evening part (ends at midnight) and the morning part (starts at midnight) of the
    overnight charge; without a window at midnight, the longest window counts as the evening part."""
    evening = [i for i, (a, b) in enumerate(charging) if b == 24.0 and a > 0.0]
    morning = [i for i, (a, b) in enumerate(charging) if a == 0.0 and b < 24.0]
    if not evening and not morning and charging and not any(a == 0.0 and b == 24.0 for a, b in charging):
        evening = [max(range(len(charging)), key=lambda i: charging[i][1] - charging[i][0])]
    return evening, morning


def draw_days(plan: DayPlan, variation: DayVariation, count: int, *, seed: int) -> list[DayPlan]:
    """``count`` days drawn from a typical day.

    Per day, in order: every window edge other than midnight moves (``shift_sd_min``); with
    probability ``missed_charge_probability`` the night after this day has no overnight charge
    (this day's evening part and the next day's morning part go); with probability
    ``topup_probability`` a ``topup_min``-minute charge starts at a uniformly drawn 5-minute mark
    between 09:00 and 18:00. Windows are then merged (:func:`normalize_windows`). A device on the
    charger all day (a board on mains) keeps its charger.

    Args:
        plan: the typical day.
        variation: how days differ.
        count: days to draw (at least 1).
        seed: the draw's seed.

    Returns:
        ``count`` plans; each ``source`` names the typical day, the day's index and what was drawn.

    Raises:
        ConfigError: ``count`` < 1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError("draw_days", [f"count={count!r}; expected an int >= 1"])
    rng = np.random.default_rng([seed, 7])
    missed = [bool(rng.random() < variation.missed_charge_probability) for _ in range(count)]
    days = []
    for d in range(count):
        usage = _shift(plan.usage, variation.shift_sd_min, rng)
        charging = _shift(plan.charging, variation.shift_sd_min, rng)
        evening, morning = _overnight(plan.charging)
        drop = set(evening if missed[d] else []) | set(morning if d > 0 and missed[d - 1] else [])
        charging = [w for i, w in enumerate(charging) if i not in drop]
        notes = []
        if missed[d]:
            notes.append("no overnight charge after it")
        if d > 0 and missed[d - 1]:
            notes.append("no overnight charge before it")
        if variation.topup_min > 0 and rng.random() < variation.topup_probability:
            low, high = _TOPUP_HOURS
            start = low + int(rng.integers(0, int((high - low) / _SLOT_H) + 1)) * _SLOT_H
            charging.append((start, start + variation.topup_min / 60.0))
            notes.append(f"a {variation.topup_min:g}-minute top-up at {_clock(start)}")
        what = "; ".join(notes) if notes else "edges moved only"
        days.append(replace(plan, usage=normalize_windows(usage), charging=normalize_windows(charging),
                            source=f"drawn from the typical day, day {d + 1} ({what}); typical day: {plan.source}"))
    return days


def cycle_days(days: Sequence[DayPlan], count: int) -> list[DayPlan]:
    """``count`` days from a trace's days in order, starting again from the first when they run out.

    >>> from edge_sleep.simulate.profiles import DayPlan
    >>> a = DayPlan((), (), 1.0, 0.0, "a"); b = DayPlan((), (), 1.0, 0.0, "b")
    >>> [d.source for d in cycle_days([a, b], 3)]
    ['a', 'b', 'a']
    """
    if not days:
        raise ConfigError("cycle_days", ["days=[]; expected at least one day. Fix: a trace that covers a whole day"])
    return [days[i % len(days)] for i in range(count)]


def _clock(hour: float) -> str:
    minutes = int(round(hour * 60.0))
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def first_use_h(plan: DayPlan) -> float:
    """When the day's first use starts (``0.0`` for a day without use)."""
    return plan.usage[0][0] if plan.usage else 0.0

