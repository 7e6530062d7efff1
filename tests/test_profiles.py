"""Device profiles: the bundled files load, every problem of a bad file is reported, DayPlan's clock."""

from __future__ import annotations

import pickle
import tomllib
from pathlib import Path

import pytest

from edge_sleep.errors import EdgeSleepError, InputError
from edge_sleep.simulate.profiles import (
    DayPlan,
    DeviceProfile,
    ProfileError,
    load_profile,
    profile_dir,
    profile_names,
)

REQUIRED = ("galaxy-s24", "iphone-15", "galaxy-a15", "raspberry-pi-5", "jetson-orin-nano")
HARDWARE = (
    "cores", "memory_mb", "memory_budget_mb", "battery_wh", "power_use_w", "power_idle_w",
    "power_active_w", "charge_w", "relative_speed",
)

GOOD_HARDWARE = """\
[hardware]
cores = { value = 4, source = "spec" }
memory_mb = { value = 4096, source = "spec" }
memory_budget_mb = { value = 256, source = "estimate: small" }
battery_wh = { value = 10.0, source = "spec: 2600 mAh x 3.85 V" }
power_use_w = { value = 1.5, source = "estimate" }
power_idle_w = { value = 0.05, source = "estimate" }
power_active_w = { value = 2.5, source = "estimate" }
charge_w = { value = 10.0, source = "estimate" }
relative_speed = { value = 0.5, source = "estimate" }
"""

GOOD_DAY = """\
[day]
source = "estimate: test day"
usage = [[7.0, 8.0], [18.0, 21.5]]
charging = [[0.0, 6.5], [23.0, 24.0]]
start_battery_frac = 0.6
learn_steps_per_usage_hour = 40
"""

GOOD = 'name = "Test phone"\nkind = "phone"\n\n' + GOOD_HARDWARE + "\n" + GOOD_DAY


def write(folder: Path, stem: str, text: str) -> Path:
    path = folder / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problem_of(folder: Path, text: str, stem: str = "bad") -> ProfileError:
    path = write(folder, stem, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(path) in str(info.value)
    return info.value


# --- bundled profiles ----------------------------------------------------------------------------


def test_required_profiles_exist() -> None:
    for stem in REQUIRED:
        assert (profile_dir() / f"{stem}.toml").is_file(), stem


def test_profile_names_lists_the_bundled_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_SLEEP_PROFILES", raising=False)
    assert profile_dir() == Path(__file__).resolve().parents[1] / "device_profiles"
    names = profile_names()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


@pytest.mark.parametrize("stem", REQUIRED)
def test_bundled_profile_loads_with_sources(stem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_SLEEP_PROFILES", raising=False)
    profile = load_profile(stem)
    assert isinstance(profile, DeviceProfile)
    assert profile.key == stem
    assert isinstance(profile.cores, int)
    assert profile.kind in ("phone", "board")
    for name in HARDWARE:
        assert profile.sources[name].strip(), name
    assert profile.sources["day"].strip()
    assert profile.memory_budget_mb <= profile.memory_mb
    assert profile.day.usage_hours() > 0
    if profile.kind == "board":
        assert not profile.has_battery
        assert profile.day.charging == ((0.0, 24.0),)
    else:
        assert profile.has_battery and profile.charge_w > 0


def test_load_by_name_and_by_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_SLEEP_PROFILES", raising=False)
    by_name = load_profile("galaxy-s24")
    by_path = load_profile(profile_dir() / "galaxy-s24.toml")
    by_str = load_profile(str(profile_dir() / "galaxy-s24.toml"))
    assert by_name == by_path == by_str


def test_env_folder_is_used_for_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "b-phone", GOOD)
    write(tmp_path, "a-phone", GOOD)
    (tmp_path / "notes.txt").write_text("not a profile")
    monkeypatch.setenv("EDGE_SLEEP_PROFILES", str(tmp_path))
    assert profile_dir() == tmp_path
    assert profile_names() == ["a-phone", "b-phone"]
    profile = load_profile("a-phone")
    assert profile.key == "a-phone" and profile.name == "Test phone"
    assert profile.path == (tmp_path / "a-phone.toml").resolve()
    assert profile.sources["battery_wh"] == "spec: 2600 mAh x 3.85 V"


# --- invalid files -------------------------------------------------------------------------------


def test_missing_field(tmp_path: Path) -> None:
    text = GOOD.replace('charge_w = { value = 10.0, source = "estimate" }\n', "")
    err = problem_of(tmp_path, text)
    assert "hardware.charge_w" in str(err) and "missing" in str(err)
    assert isinstance(err, EdgeSleepError) and isinstance(err, ValueError)


def test_missing_source(tmp_path: Path) -> None:
    err = problem_of(tmp_path, GOOD.replace('cores = { value = 4, source = "spec" }', "cores = { value = 4 }"))
    assert "hardware.cores.source" in str(err)


def test_budget_above_memory(tmp_path: Path) -> None:
    text = GOOD.replace("memory_budget_mb = { value = 256", "memory_budget_mb = { value = 8192")
    err = problem_of(tmp_path, text)
    assert "hardware.memory_budget_mb" in str(err) and "8192" in str(err) and "4096" in str(err)
    assert len(err.problems) == 1


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("cores = { value = 4,", "cores = { value = 300,", "hardware.cores"),
        ("cores = { value = 4,", "cores = { value = 4.5,", "hardware.cores"),
        ("memory_mb = { value = 4096,", "memory_mb = { value = 0,", "hardware.memory_mb"),
        ("battery_wh = { value = 10.0,", "battery_wh = { value = 250.0,", "hardware.battery_wh"),
        ("power_active_w = { value = 2.5,", "power_active_w = { value = 0,", "hardware.power_active_w"),
        ("power_idle_w = { value = 0.05,", "power_idle_w = { value = -1,", "hardware.power_idle_w"),
        ("charge_w = { value = 10.0,", "charge_w = { value = 0,", "hardware.charge_w"),
        ("relative_speed = { value = 0.5,", "relative_speed = { value = inf,", "hardware.relative_speed"),
        ('kind = "phone"', 'kind = "watch"', "kind"),
        ("start_battery_frac = 0.6", "start_battery_frac = 0.0", "day.start_battery_frac"),
        ("learn_steps_per_usage_hour = 40", "learn_steps_per_usage_hour = -1", "day.learn_steps_per_usage_hour"),
        ("usage = [[7.0, 8.0], [18.0, 21.5]]", "usage = []", "day.usage"),
        ("usage = [[7.0, 8.0], [18.0, 21.5]]", "usage = [[7.0, 25.0]]", "day.usage[0]"),
        ("usage = [[7.0, 8.0], [18.0, 21.5]]", "usage = [[8.0, 7.0]]", "day.usage[0]"),
        ("usage = [[7.0, 8.0], [18.0, 21.5]]", "usage = [[18.0, 21.5], [7.0, 8.0]]", "day.usage[1]"),
        ("usage = [[7.0, 8.0], [18.0, 21.5]]", "usage = [[7.0, 8.0, 9.0]]", "day.usage[0]"),
        ('source = "estimate: test day"', 'source = ""', "day.source"),
    ],
)
def test_out_of_range_values(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    err = problem_of(tmp_path, GOOD.replace(old, new))
    assert field in str(err)


def test_overlapping_windows(tmp_path: Path) -> None:
    text = GOOD.replace("charging = [[0.0, 6.5], [23.0, 24.0]]", "charging = [[0.0, 6.5], [6.0, 7.0]]")
    err = problem_of(tmp_path, text)
    assert "day.charging[1]" in str(err) and "overlaps" in str(err)


def test_touching_windows_and_empty_charging_are_fine(tmp_path: Path) -> None:
    text = GOOD.replace("usage = [[7.0, 8.0], [18.0, 21.5]]", "usage = [[7.0, 8.0], [8.0, 9.0]]")
    text = text.replace("charging = [[0.0, 6.5], [23.0, 24.0]]", "charging = []")
    profile = load_profile(write(tmp_path, "ok", text))
    assert profile.day.charging == ()
    assert profile.day.usage_hours() == 2.0


def test_typo_keys(tmp_path: Path) -> None:
    text = GOOD.replace("memory_budget_mb =", "memory_budjet_mb =").replace("learn_steps_per_usage_hour", "learn_step_per_usage_hour")
    text = text.replace('cores = { value = 4, source = "spec" }', 'cores = { value = 4, sauce = "spec", source = "spec" }')
    text = 'nmae = "x"\n' + text
    err = problem_of(tmp_path, text)
    message = str(err)
    for dotted in ("hardware.memory_budjet_mb", "day.learn_step_per_usage_hour", "hardware.cores.sauce", "nmae"):
        assert dotted in message, dotted
    assert "'memory_budget_mb'" in message  # the fix suggests the right name


def test_non_numeric_values(tmp_path: Path) -> None:
    text = GOOD.replace("battery_wh = { value = 10.0,", 'battery_wh = { value = "10 Wh",')
    text = text.replace("charge_w = { value = 10.0,", "charge_w = { value = true,")
    text = text.replace("usage = [[7.0, 8.0], [18.0, 21.5]]", 'usage = [["7", 8.0]]')
    err = problem_of(tmp_path, text)
    message = str(err)
    assert "hardware.battery_wh = '10 Wh'" in message
    assert "hardware.charge_w = True" in message
    assert "day.usage[0]" in message


def test_not_an_inline_table(tmp_path: Path) -> None:
    err = problem_of(tmp_path, GOOD.replace('cores = { value = 4, source = "spec" }', "cores = 4"))
    assert "hardware.cores = 4" in str(err) and "inline table" in str(err)


def test_all_problems_in_one_error(tmp_path: Path) -> None:
    text = GOOD.replace("memory_budget_mb = { value = 256", "memory_budget_mb = { value = 8192")
    text = text.replace('kind = "phone"', 'kind = "tablet"')
    text = text.replace("start_battery_frac = 0.6", "start_battery_frac = 2")
    err = problem_of(tmp_path, text)
    assert len(err.problems) == 3
    assert len(str(err).splitlines()) == 4  # a heading, then one line per problem
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and clone.problems == err.problems


def test_missing_tables(tmp_path: Path) -> None:
    err = problem_of(tmp_path, 'name = "x"\nkind = "board"\n')
    assert "hardware = missing" in str(err) and "day = missing" in str(err)


def test_invalid_toml(tmp_path: Path) -> None:
    err = problem_of(tmp_path, GOOD.replace('name = "Test phone"', 'name = "Test phone'))
    assert "invalid TOML" in str(err)
    assert not isinstance(err, tomllib.TOMLDecodeError)
    assert err.__cause__ is None and err.__suppress_context__


def test_unknown_name_lists_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "alpha", GOOD)
    write(tmp_path, "beta", GOOD)
    monkeypatch.setenv("EDGE_SLEEP_PROFILES", str(tmp_path))
    with pytest.raises(ProfileError) as info:
        load_profile("gamma")
    message = str(info.value)
    assert "'gamma'" in message and "alpha, beta" in message and str(tmp_path) in message


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nowhere.toml")


# --- DayPlan -------------------------------------------------------------------------------------

PLAN = DayPlan(
    usage=((7.0, 8.0), (12.0, 12.5), (18.0, 22.0)),
    charging=((0.0, 6.5), (23.0, 24.0)),
    start_battery_frac=0.5,
    learn_steps_per_usage_hour=40.0,
    source="estimate: hand-written",
)


def test_in_usage_and_charging_are_half_open() -> None:
    assert not PLAN.in_usage(6.99)
    assert PLAN.in_usage(7.0) and PLAN.in_usage(7.99)
    assert not PLAN.in_usage(8.0)
    assert PLAN.in_usage(12.25) and not PLAN.in_usage(12.5)
    assert PLAN.charging_at(0.0) and PLAN.charging_at(6.49) and not PLAN.charging_at(6.5)
    assert PLAN.charging_at(23.5) and not PLAN.charging_at(22.99)


def test_usage_hours() -> None:
    assert PLAN.usage_hours() == pytest.approx(5.5)


def test_next_change() -> None:
    assert PLAN.next_change(0.0) == 6.5
    assert PLAN.next_change(6.5) == 7.0
    assert PLAN.next_change(7.5) == 8.0
    assert PLAN.next_change(8.0) == 12.0
    assert PLAN.next_change(22.0) == 23.0
    assert PLAN.next_change(23.0) == 24.0
    assert PLAN.next_change(23.9) == 24.0
    bare = DayPlan(usage=((9.0, 17.0),), charging=(), start_battery_frac=1.0,
                   learn_steps_per_usage_hour=0.0, source="x")
    assert bare.next_change(17.0) == 24.0


@pytest.mark.parametrize("hour", [-0.5, 24.0, 30.0, float("nan")])
def test_hour_out_of_range(hour: float) -> None:
    with pytest.raises(InputError, match="hour"):
        PLAN.in_usage(hour)
    with pytest.raises(InputError):
        PLAN.next_change(hour)


@pytest.mark.parametrize("source", ["estimate: hand-written", 'quote " and \\ backslash\nnewline', "naïve ünïcode"])
def test_to_toml_round_trips(tmp_path: Path, source: str) -> None:
    plan = DayPlan(PLAN.usage, PLAN.charging, 0.55, 12.5, source)
    text = plan.to_toml()
    assert text.startswith("[day]\n")
    assert tomllib.loads(text)["day"]["source"] == source
    profile_text = 'name = "Round trip"\nkind = "phone"\n\n' + GOOD_HARDWARE + "\n" + text
    profile = load_profile(write(tmp_path, "round-trip", profile_text))
    assert profile.day == plan
    assert profile.sources["day"] == source


def test_to_toml_of_a_bundled_day(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGE_SLEEP_PROFILES", raising=False)
    day = load_profile("raspberry-pi-5").day
    assert "learn_steps_per_usage_hour = 40\n" in day.to_toml()
    profile = load_profile(write(tmp_path, "pi", 'name = "Pi"\nkind = "board"\n\n' + GOOD_HARDWARE + "\n" + day.to_toml()))
    assert profile.day == day
