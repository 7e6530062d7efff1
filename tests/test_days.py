"""Days that differ (issue 24, item 2): days drawn from a profile's [variation], and a trace's days cycled."""

from __future__ import annotations

import pytest

from edge_sleep.errors import ConfigError
from edge_sleep.simulate.days import cycle_days, draw_days, normalize_windows
from edge_sleep.simulate.profiles import DayPlan, DayVariation, load_profile, profile_names

PLAN = DayPlan(usage=((7.0, 8.0), (19.0, 21.5)), charging=((0.0, 6.5), (23.0, 24.0)), start_battery_frac=0.6,
               learn_steps_per_usage_hour=40.0, source="estimate: test")


def test_the_same_seed_draws_the_same_days_and_another_seed_others() -> None:
    variation = DayVariation(shift_sd_min=30.0, missed_charge_probability=0.3, topup_probability=0.5, topup_min=45.0)
    a = draw_days(PLAN, variation, 7, seed=1)
    assert a == draw_days(PLAN, variation, 7, seed=1)
    assert a != draw_days(PLAN, variation, 7, seed=2)
    assert len({(d.usage, d.charging) for d in a}) > 1  # the days differ
    for d in a:  # every window is on the 5-minute grid, sorted, inside the day and not overlapping
        for windows in (d.usage, d.charging):
            assert windows == normalize_windows(windows)
            assert all(abs(x * 12 - round(x * 12)) < 1e-3 for w in windows for x in w)


def test_without_variation_every_drawn_day_is_the_typical_day() -> None:
    days = draw_days(PLAN, DayVariation(), 3, seed=0)
    assert [(d.usage, d.charging, d.start_battery_frac) for d in days] == [(PLAN.usage, PLAN.charging, 0.6)] * 3


def test_a_missed_overnight_charge_removes_the_evening_and_the_next_morning() -> None:
    days = draw_days(PLAN, DayVariation(missed_charge_probability=1.0), 3, seed=0)
    assert days[0].charging == ((0.0, 6.5),)  # the night before the simulation happened
    assert days[1].charging == () and days[2].charging == ()
    assert "no overnight charge after it" in days[0].source and "no overnight charge before it" in days[1].source


def test_a_topup_is_a_daytime_charge_of_its_length() -> None:
    (day,) = draw_days(PLAN, DayVariation(topup_probability=1.0, topup_min=45.0), 1, seed=4)
    (topup,) = [w for w in day.charging if w not in PLAN.charging]
    assert 9.0 <= topup[0] <= 18.0 and topup[1] - topup[0] == pytest.approx(0.75, abs=1e-3)
    assert "45-minute top-up" in day.source


def test_a_board_on_mains_keeps_its_charger() -> None:
    board = DayPlan(usage=((9.0, 18.0),), charging=((0.0, 24.0),), start_battery_frac=1.0,
                    learn_steps_per_usage_hour=40.0, source="board")
    days = draw_days(board, DayVariation(shift_sd_min=60.0, missed_charge_probability=1.0), 3, seed=0)
    assert all(d.charging == ((0.0, 24.0),) for d in days)


def test_bundled_profiles_give_a_sourced_variation() -> None:
    for name in profile_names():
        profile = load_profile(name)
        assert profile.variation is not None, name
        for key in ("shift_sd_min", "missed_charge_probability", "topup_probability", "topup_min"):
            assert profile.sources[f"variation.{key}"].strip(), (name, key)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="count=0"):
        draw_days(PLAN, DayVariation(), 0, seed=0)
    with pytest.raises(ConfigError, match="at least one day"):
        cycle_days([], 3)
    assert normalize_windows([(23.0, 25.0), (-1.0, 0.5), (3.0, 3.0)]) == ((0.0, 0.5), (23.0, 24.0))


def test_a_bad_variation_table_names_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edge_sleep.simulate.profiles import ProfileError, profile_dir

    text = (profile_dir() / "galaxy-s24.toml").read_text()
    bad = text.replace("missed_charge_probability = { value = 0.1,", "missed_charge_probability = { value = 1.5,")
    bad = bad.replace("topup_min = {", "topup_minutes = {")
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    message = str(e.value)
    assert "variation.missed_charge_probability = 1.5" in message and "variation.topup_minutes" in message
    assert "variation.topup_min is missing" in message
