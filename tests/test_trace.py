"""Tests for edge_sleep.simulate.trace and tools/day_from_trace.py."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_sleep.errors import ConfigError, EdgeSleepError
from edge_sleep.simulate.profiles import DayPlan
from edge_sleep.simulate.trace import (
    TraceError,
    TraceEvent,
    day_from_events,
    day_from_trace,
    day_to_toml,
    days_from_trace,
    describe_trace,
    read_trace,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "day_from_trace.py"
START = datetime(2026, 11, 20)

Row = tuple[datetime, str, str, str]  # time, battery, charging, screen


def phone_rows(days: int = 3, *, battery: tuple[str, str] = ("0.6", "0.9"),
               extra: dict[int, list[tuple[int, int]]] | None = None) -> list[Row]:
    """Screen on 07-08 and 19-21, charging 23-07, every day; ``extra`` adds usage per day."""
    rows: list[Row] = []
    for d in range(days):
        base = START + timedelta(days=d)
        at = lambda h: base + timedelta(hours=h)  # noqa: E731
        rows.append((at(0), battery[0], "charging", "off"))
        rows.append((at(7), battery[1], "discharging", "on"))
        rows.append((at(8), "", "", "off"))
        for start, end in (extra or {}).get(d, []):
            rows.append((at(start), "", "", "on"))
            rows.append((at(end), "", "", "off"))
        rows.append((at(19), "", "", "on"))
        rows.append((at(21), "", "", "off"))
        rows.append((at(23), "", "charging", ""))
    rows.append((START + timedelta(days=days), battery[0], "charging", "off"))
    rows.sort(key=lambda r: r[0])
    return rows


def write_csv(path: Path, rows: list[Row], *, header: str = "time,battery,charging,screen",
              time_format: str = "iso") -> Path:
    lines = [header]
    for when, battery, charging, screen in rows:
        if time_format == "unix":
            stamp = str(int(when.replace(tzinfo=timezone.utc).timestamp()))
        else:
            stamp = when.isoformat()
        lines.append(f"{stamp},{battery},{charging},{screen}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL.relative_to(REPO_ROOT)), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


# (a) a three-day phone trace
def test_three_day_phone_trace(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "phone.csv", phone_rows())
    events = read_trace(path)
    assert events[0] == TraceEvent(time_s=(START - datetime(1970, 1, 1)).total_seconds(),
                                   battery_frac=0.6, charging=True, screen_on=False)
    assert events[2].battery_frac is None and events[2].charging is None
    day = day_from_events(events, source="x")
    assert day.usage == ((7.0, 8.0), (19.0, 21.0))
    assert day.charging == ((0.0, 7.0), (23.0, 24.0))
    assert day.start_battery_frac == 0.6
    assert day.learn_steps_per_usage_hour == 40.0 and day.source == "x"
    assert describe_trace(path, events) == "trace: phone.csv (3 days, 2026-11-20 to 2026-11-22)"
    assert day_from_trace(path).source == "trace: phone.csv (3 days, 2026-11-20 to 2026-11-22)"


def test_windows_round_to_the_resolution(tmp_path: Path) -> None:
    rows = [(START + timedelta(hours=7, minutes=2), "", "", "on"),
            (START + timedelta(hours=7, minutes=44), "", "", "off"),
            (START + timedelta(hours=9), "", "", "")]
    day = day_from_events(read_trace(write_csv(tmp_path / "t.csv", rows)), source="t")
    assert day.usage == ((7.0, 7.75),)
    day15 = day_from_events(read_trace(tmp_path / "t.csv"), resolution_min=15, source="t")
    assert day15.usage == ((7.0, 7.75),)
    assert day.charging == ()


# (b) the majority rule
def test_usage_on_one_of_three_days_is_dropped_two_of_three_kept(tmp_path: Path) -> None:
    rows = phone_rows(extra={0: [(12, 13), (15, 16)], 1: [(15, 16)]})
    day = day_from_trace(write_csv(tmp_path / "phone.csv", rows))
    assert day.usage == ((7.0, 8.0), (15.0, 16.0), (19.0, 21.0))


def test_majority_counts_only_days_that_cover_the_slot(tmp_path: Path) -> None:
    # Day 1 from 06:00, day 2 to 12:00: 09:00-10:00 is covered by both, used on one (half: kept);
    # 05:00-06:00 is covered by day 2 alone, where it is on (kept).
    rows = [(START + timedelta(hours=6), "", "", "off"),
            (START + timedelta(hours=9), "", "", "on"),
            (START + timedelta(hours=10), "", "", "off"),
            (START + timedelta(hours=29), "", "", "on"),
            (START + timedelta(hours=30), "", "", "off"),
            (START + timedelta(hours=36), "", "", "")]
    day = day_from_trace(write_csv(tmp_path / "t.csv", rows))
    assert day.usage == ((5.0, 6.0), (9.0, 10.0))
    assert day.source == "trace: t.csv (2 days, 2026-11-20 to 2026-11-21)"


# (c) percent versus fraction
def test_percent_and_fraction_give_the_same_day(tmp_path: Path) -> None:
    frac = day_from_trace(write_csv(tmp_path / "frac.csv", phone_rows(battery=("0.6", "0.9"))))
    pct = day_from_trace(write_csv(tmp_path / "pct.csv", phone_rows(battery=("60", "90"))))
    assert frac.start_battery_frac == pct.start_battery_frac == 0.6
    assert (frac.usage, frac.charging) == (pct.usage, pct.charging)
    events = read_trace(tmp_path / "pct.csv")
    assert {e.battery_frac for e in events if e.battery_frac is not None} == {0.6, 0.9}


def test_percent_is_decided_per_file(tmp_path: Path) -> None:
    # A '1' in a file with a value above 1 is 1 %, and a '%' sign alone makes the file percent.
    rows = [(START, "1", "", ""), (START + timedelta(hours=2), "80", "", "")]
    assert [e.battery_frac for e in read_trace(write_csv(tmp_path / "a.csv", rows))] == [0.01, 0.8]
    rows = [(START, "1%", "", ""), (START + timedelta(hours=2), "", "", "")]
    assert read_trace(write_csv(tmp_path / "b.csv", rows))[0].battery_frac == 0.01


def test_start_battery_without_midnight_empty_level_and_no_battery(tmp_path: Path) -> None:
    rows = [(START + timedelta(hours=7), "", "", "on"), (START + timedelta(hours=8), "0.45", "", ""),
            (START + timedelta(hours=10), "0.3", "", "off")]
    assert day_from_trace(write_csv(tmp_path / "a.csv", rows)).start_battery_frac == 0.45
    rows = [(START, "0", "", ""), (START + timedelta(hours=3), "0.2", "", "")]
    assert day_from_trace(write_csv(tmp_path / "b.csv", rows)).start_battery_frac == 0.01
    path = tmp_path / "c.csv"
    path.write_text("time,screen\n2026-11-20T07:00:00,on\n2026-11-20T09:00:00,off\n")
    day = day_from_trace(path)
    assert day.start_battery_frac == 1.0 and day.usage == ((7.0, 9.0),) and day.charging == ()


def test_no_screen_column_means_no_usage(tmp_path: Path) -> None:
    path = tmp_path / "upower.csv"
    path.write_text("Time,Charging,Battery,Extra\n"
                    "2026-11-20T00:00:00,fully-charged,100,x\n"
                    "2026-11-20T06:00:00,discharging,95,y\n"
                    "2026-11-20T22:00:00,Charging,40,\n"
                    "2026-11-21T00:00:00,full,70\n")
    day = day_from_trace(path)
    assert day.usage == ()
    assert day.charging == ((0.0, 6.0), (22.0, 24.0))
    assert day.start_battery_frac == 0.85  # median of 1.0 and 0.7


# (d) unix seconds, and offsets ignored for the hour of day
def test_unix_seconds_give_the_same_day(tmp_path: Path) -> None:
    iso = day_from_trace(write_csv(tmp_path / "iso.csv", phone_rows()))
    unix = day_from_trace(write_csv(tmp_path / "unix.csv", phone_rows(), time_format="unix"), tz="UTC")
    assert (unix.usage, unix.charging, unix.start_battery_frac) == (
        iso.usage, iso.charging, iso.start_battery_frac)
    assert unix.source == "trace: unix.csv (3 days, 2026-11-20 to 2026-11-22)"


def test_unix_seconds_need_the_devices_time_zone(tmp_path: Path) -> None:
    """Issue 24: a trace from UTC-8 read as UTC put its usage at 03:00-05:30, silently."""
    path = write_csv(tmp_path / "unix.csv", phone_rows(), time_format="unix")
    with pytest.raises(TraceError, match="unix seconds carry no time zone") as e:
        day_from_trace(path)
    assert "--tz" in str(e.value)
    utc = day_from_trace(path, tz="UTC")
    pacific = day_from_trace(path, tz="-08:00")  # the same instants, eight hours earlier on the wall clock
    shift = [((a - 8) % 24, (b - 8) % 24 or 24.0) for a, b in utc.usage]
    assert sorted(pacific.usage) == sorted(shift)
    with pytest.raises(ConfigError, match="tz='Mars/Olympus'"):
        day_from_trace(path, tz="Mars/Olympus")
    run = run_tool(str(path), "--tz=-08:00")  # an offset starts with "-": given with "="
    assert run.returncode == 0 and "usage" in run.stdout


def test_offsets_keep_the_wall_clock(tmp_path: Path) -> None:
    path = tmp_path / "tz.csv"
    path.write_text("time,screen\n2026-11-20T07:00:00+09:00,on\n2026-11-20T08:00:00Z,off\n"
                    "2026-11-20T09:00:00-05:00,\n")
    events = read_trace(path)
    assert [e.time_s % 86400 / 3600 for e in events] == [7.0, 8.0, 9.0]
    assert day_from_trace(path).usage == ((7.0, 8.0),)


# (e) errors
def test_out_of_order_time_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,screen\n2026-11-20T07:00:00,on\n2026-11-20T09:00:00,off\n"
                    "2026-11-20T08:00:00,on\n")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    err = info.value
    assert (err.line, err.column, err.value) == (4, "time", "2026-11-20T08:00:00")
    assert "line 4" in str(err) and "bad.csv" in str(err) and "line 3" in str(err)
    assert "Fix:" in str(err)
    assert isinstance(err, ValueError) and isinstance(err, EdgeSleepError)


def test_bad_charging_token(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,charging\n2026-11-20T07:00:00,true\n2026-11-20T09:00:00,plugged\n")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    message = str(info.value)
    assert "bad.csv" in message and "line 3" in message and "'charging'" in message
    assert "'plugged'" in message and "discharging" in message and "Fix:" in message


def test_bad_screen_token_and_bad_time(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,screen\n2026-11-20T07:00:00,dim\n")
    with pytest.raises(TraceError, match=r"line 2, column 'screen'.*'dim'"):
        read_trace(path)
    path.write_text("time,screen\nyesterday,on\n")
    with pytest.raises(TraceError, match=r"line 2, column 'time'.*'yesterday'"):
        read_trace(path)
    path.write_text("time,screen\n1763622000000,on\n")
    with pytest.raises(TraceError, match="milliseconds"):
        read_trace(path)


@pytest.mark.parametrize("value", ["150", "-3", "lots", "nan"])
def test_battery_out_of_range(tmp_path: Path, value: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"time,battery\n2026-11-20T07:00:00,50\n2026-11-20T09:00:00,{value}\n")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert (info.value.line, info.value.column, info.value.value) == (3, "battery", value)
    assert "percent in [0, 100]" in str(info.value)


def test_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("when,battery\n2026-11-20T07:00:00,0.5\n")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert (info.value.line, info.value.column) == (1, "time")
    assert "bad.csv" in str(info.value) and "'time'" in str(info.value)
    path.write_text("time,volume\n2026-11-20T07:00:00,3\n")
    with pytest.raises(TraceError, match="battery, charging or screen"):
        read_trace(path)
    path.write_text("")
    with pytest.raises(TraceError, match="empty"):
        read_trace(path)
    path.write_text("time,screen\n")
    with pytest.raises(TraceError, match="no rows"):
        read_trace(path)
    path.write_text("time,screen\n2026-11-20T07:00:00,on,extra\n")
    with pytest.raises(TraceError, match="line 2.*more cells"):
        read_trace(path)


def test_trace_under_one_hour(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("time,screen\n2026-11-20T07:00:00,on\n2026-11-20T07:59:00,off\n")
    events = read_trace(path)
    with pytest.raises(TraceError, match="less than 1 hour"):
        day_from_events(events, source="s")
    with pytest.raises(TraceError) as info:
        day_from_trace(path)
    assert info.value.path == path and "short.csv" in str(info.value)
    assert info.value.column == "time" and "59.0 min" in str(info.value)


def test_bad_arguments_and_unsorted_events() -> None:
    events = [TraceEvent(0.0, screen_on=True), TraceEvent(7200.0, screen_on=False)]
    with pytest.raises(ConfigError, match="resolution_min=7"):
        day_from_events(events, resolution_min=7, source="s")
    with pytest.raises(TraceError, match="non-decreasing"):
        day_from_events(events[::-1], source="s")
    with pytest.raises(TraceError, match="no events"):
        day_from_events([], source="s")


def test_day_to_toml_schema() -> None:
    plan = DayPlan(usage=((7.0, 7.75), (12.5, 13.0)), charging=((0.0, 6.5), (23.0, 24.0)),
                   start_battery_frac=0.6, learn_steps_per_usage_hour=40.0,
                   source='trace: "phone".csv (3 days, 2026-11-20 to 2026-11-22)')
    text = day_to_toml(plan)
    assert text.startswith("[day]\n") and text.endswith("\n")
    assert tomllib.loads(text) == {"day": {
        "source": 'trace: "phone".csv (3 days, 2026-11-20 to 2026-11-22)',
        "usage": [[7.0, 7.75], [12.5, 13.0]], "charging": [[0.0, 6.5], [23.0, 24.0]],
        "start_battery_frac": 0.6, "learn_steps_per_usage_hour": 40}}
    empty = DayPlan(usage=(), charging=(), start_battery_frac=1.0,
                    learn_steps_per_usage_hour=12.5, source="estimate: none")
    assert tomllib.loads(day_to_toml(empty))["day"]["usage"] == []


# (f) the tool, end to end
def test_tool_prints_the_day(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "phone.csv", phone_rows())
    result = run_tool(str(path), "--learn-steps-per-hour", "25")
    assert result.returncode == 0, result.stderr
    day = tomllib.loads(result.stdout)["day"]
    assert day["usage"] == [[7.0, 8.0], [19.0, 21.0]]
    assert day["charging"] == [[0.0, 7.0], [23.0, 24.0]]
    assert day["start_battery_frac"] == 0.6 and day["learn_steps_per_usage_hour"] == 25
    assert day["source"] == "trace: phone.csv (3 days, 2026-11-20 to 2026-11-22)"


@pytest.mark.slow
def test_tool_writes_out_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "phone.csv", phone_rows())
    out = tmp_path / "day.toml"
    out.write_text("old")
    result = run_tool(str(path), "--out", str(out), "--resolution-min", "15")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert tomllib.loads(out.read_text())["day"]["usage"] == [[7.0, 8.0], [19.0, 21.0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day.toml", "phone.csv"]


def test_tool_bad_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,battery\n2026-11-20T07:00:00,50\n2026-11-20T09:00:00,150\n")
    result = run_tool(str(path))
    assert result.returncode == 2
    assert "bad.csv" in result.stderr and "line 3" in result.stderr and "150" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    missing = run_tool(str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "nope.csv" in missing.stderr
    assert "Traceback" not in missing.stderr


# (c) each day of a trace kept, not folded (issue 24: a missed overnight charge and a daytime top-up vanished)
def test_days_from_trace_keeps_each_whole_day(tmp_path: Path) -> None:
    rows = phone_rows(days=3, extra={2: [(15, 16)]})
    night1 = START + timedelta(days=1, hours=23)
    rows = [r for r in rows if r[0] != night1]  # day 2 (2026-11-21): no charge at 23:00 ...
    rows = [(w, b, "" if w == START + timedelta(days=2) else c, s) for w, b, c, s in rows]  # ... nor after midnight
    rows += [(START + timedelta(days=1, hours=23, minutes=30), "", "", ""),
             (START + timedelta(days=2, hours=13), "", "charging", ""),  # day 3: a top-up 13:00-14:00
             (START + timedelta(days=2, hours=14), "", "discharging", "")]
    rows.sort(key=lambda r: r[0])
    path = write_csv(tmp_path / "phone.csv", rows)
    days = days_from_trace(path)
    assert [d.source for d in days] == [f"trace: phone.csv, 2026-11-2{i}" for i in (0, 1, 2)]
    assert days[0].charging == ((0.0, 7.0), (23.0, 24.0))
    assert days[1].charging == ((0.0, 7.0),)  # the missed overnight charge stays missed
    assert days[2].charging == ((13.0, 14.0), (23.0, 24.0))  # no charge the next morning; the top-up stays
    assert days[2].usage == ((7.0, 8.0), (15.0, 16.0), (19.0, 21.0))  # one day's extra use is kept, not voted out
    assert days[0].start_battery_frac == 0.6
    # the folded day votes both away
    assert day_from_trace(path).charging == ((0.0, 7.0), (23.0, 24.0))


def test_days_from_trace_refuses_a_trace_without_a_whole_day(tmp_path: Path) -> None:
    rows = [(START + timedelta(hours=6), "0.5", "charging", "off"), (START + timedelta(hours=30), "", "", "")]
    with pytest.raises(TraceError, match="no whole calendar day") as e:
        days_from_trace(write_csv(tmp_path / "short.csv", rows))
    assert "day_from_trace" in str(e.value) and "short.csv" in str(e.value)
