"""DeviceState probes on fake sysfs trees, the policies, and the ProbeSet."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep, StoreConfig, WakeConfig
from edge_sleep.errors import ConfigError
from edge_sleep.schedule import (
    AdaptivePolicy,
    CpuLoad,
    DeviceState,
    IdleAndCharging,
    LinuxProbe,
    ProbeSet,
    SleepPressure,
    mark_activity,
    thermal_state,
)
from tests.conftest import small_mlp


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


def laptop(root: Path, *, status: str = "Discharging", capacity: str = "81", ac: str = "0") -> Path:
    write(root, "class/power_supply/BAT0/type", "Battery")
    write(root, "class/power_supply/BAT0/present", "1")
    write(root, "class/power_supply/BAT0/status", status)
    write(root, "class/power_supply/BAT0/capacity", capacity)
    write(root, "class/power_supply/AC/type", "Mains")
    write(root, "class/power_supply/AC/online", ac)
    write(root, "class/thermal/thermal_zone0/type", "acpitz")
    write(root, "class/thermal/thermal_zone0/temp", "47000")
    write(root, "class/thermal/thermal_zone1/type", "x86_pkg_temp")
    write(root, "class/thermal/thermal_zone1/temp", "66500")
    write(root, "class/thermal/thermal_zone2/type", "iwlwifi_1")  # a Wi-Fi card's zone: not the device's heat
    write(root, "class/thermal/thermal_zone2/temp", "100000")
    write(root, "class/backlight/intel_backlight/bl_power", "0")
    write(root, "class/backlight/intel_backlight/brightness", "400")
    return root


def test_linux_probe_reads_a_laptop(tmp_path: Path) -> None:
    sys_root = laptop(tmp_path / "sys")
    dev = tmp_path / "dev"
    (dev / "pts").mkdir(parents=True)
    (dev / "pts" / "0").write_text("")
    os.utime(dev / "pts" / "0", (1000.0, 1000.0))
    state = LinuxProbe(sys_root=sys_root, dev_root=dev, clock=lambda: 1600.0, use_psutil=False,
                       use_terminals=True, cpu_load=None)()
    assert state == DeviceState(charging=False, battery_frac=0.81, idle_s=600.0, thermal="fair",
                                screen_on=True, temperature_c=66.5)
    # by default the terminals say nothing (a busy server's are idle for hours), every zone type is read
    # with thermal_types=None
    every = LinuxProbe(sys_root=sys_root, dev_root=dev, use_psutil=False, cpu_load=None, thermal_types=None)()
    assert every.idle_s is None and every.temperature_c == 100.0 and every.thermal == "critical"
    assert "battery=81%" in state.describe() and "idle=600s" in state.describe()


@pytest.mark.parametrize("status, ac, charging", [("Charging", "1", True), ("Full", "0", True),
                                                  ("Not charging", "1", True), ("Discharging", "0", False)])
def test_linux_probe_charging_states(tmp_path: Path, status: str, ac: str, charging: bool) -> None:
    probe = LinuxProbe(sys_root=laptop(tmp_path, status=status, ac=ac), dev_root=tmp_path / "nodev",
                       use_psutil=False)
    assert probe.power()[0] is charging


def test_linux_probe_energy_counters_and_screen_off(tmp_path: Path) -> None:
    write(tmp_path, "class/power_supply/BAT1/type", "Battery")
    write(tmp_path, "class/power_supply/BAT1/status", "Discharging")
    write(tmp_path, "class/power_supply/BAT1/energy_now", "30000000")
    write(tmp_path, "class/power_supply/BAT1/energy_full", "40000000")
    write(tmp_path, "class/backlight/bl/bl_power", "4")
    write(tmp_path, "class/backlight/bl/brightness", "300")
    probe = LinuxProbe(sys_root=tmp_path, dev_root=tmp_path / "nodev", use_psutil=False)
    state = probe()
    assert state.battery_frac == pytest.approx(0.75) and state.screen_on is False
    assert state.idle_s is None and state.thermal == "unknown"


def test_a_server_is_unknown_not_wrong(tmp_path: Path) -> None:
    """No power supply, no thermal zone, no backlight, no terminal: every field says unknown."""
    state = LinuxProbe(sys_root=tmp_path, dev_root=tmp_path, use_psutil=False, cpu_load=None)()
    assert state == DeviceState()
    assert state.describe() == "charging=unknown battery=none idle=unknown thermal=unknown screen=unknown"


def test_a_mains_board_is_charging_without_a_battery(tmp_path: Path) -> None:
    write(tmp_path, "class/power_supply/usb/type", "USB")
    write(tmp_path, "class/power_supply/usb/online", "1")
    assert LinuxProbe(sys_root=tmp_path, dev_root=tmp_path, use_psutil=False).power() == (True, None)


def test_a_board_on_mains_with_no_charger_to_read_counts_as_charging(tmp_path: Path) -> None:
    """Issue 24: with no power_supply entry, every poll said "charging state unknown"."""
    bare = LinuxProbe(sys_root=tmp_path, dev_root=tmp_path, use_psutil=False, cpu_load=None)
    assert bare.power() == (None, None)
    assert IdleAndCharging().device_allows(bare()) == "charging state unknown (requires external power)"
    board = LinuxProbe(sys_root=tmp_path, dev_root=tmp_path, use_psutil=False, cpu_load=None, mains=True)
    assert board.power() == (True, None) and IdleAndCharging().device_allows(board()) is None


def test_idle_comes_from_the_apps_activity_file(tmp_path: Path) -> None:
    marker = tmp_path / "app" / "activity"
    probe = LinuxProbe(sys_root=tmp_path, dev_root=tmp_path, use_psutil=False, cpu_load=None,
                       activity_file=marker, clock=lambda: 5000.0)
    assert probe.idle_s() is None  # the app has not said anything yet
    mark_activity(marker, when=4990.0)
    assert probe.idle_s() == 10.0
    assert IdleAndCharging().device_allows(DeviceState(charging=True, idle_s=probe.idle_s())) == "idle 10s < 900s"
    mark_activity(marker, when=1000.0)
    assert probe.idle_s() == 4000.0


def test_thermal_error_codes_are_not_heat(tmp_path: Path) -> None:
    write(tmp_path, "class/thermal/thermal_zone0/type", "cpu-thermal")
    write(tmp_path, "class/thermal/thermal_zone0/temp", "255000")  # an error code, not 255 C
    write(tmp_path, "class/thermal/thermal_zone1/type", "soc-thermal")
    write(tmp_path, "class/thermal/thermal_zone1/temp", "52000")
    assert LinuxProbe(sys_root=tmp_path, dev_root=tmp_path, use_psutil=False, cpu_load=None).temperature_c() == 52.0


def test_cpu_load_counts_other_processes_and_the_policy_refuses_a_busy_device() -> None:
    load = CpuLoad()
    assert load() is None  # nothing to compare with yet
    sum(i * i for i in range(2_000_000))  # this process's own work is not load
    share = load()
    assert share is not None and 0.0 <= share <= 1.0
    busy = DeviceState(charging=True, idle_s=3600.0, cpu_load=0.9)
    assert IdleAndCharging().device_allows(busy) == "cpu busy: other processes use 90% of the cores > 50%"
    assert IdleAndCharging(max_cpu_load=0.95).device_allows(busy) is None
    with pytest.raises(ConfigError, match="max_cpu_load=0"):
        IdleAndCharging(max_cpu_load=0.0)


def test_the_real_probe_runs_here() -> None:
    state = LinuxProbe()()
    assert state.thermal in ("nominal", "fair", "serious", "critical", "unknown")
    assert state.battery_frac is None or 0.0 <= state.battery_frac <= 1.0


def test_thermal_thresholds() -> None:
    assert thermal_state(59.9) == "nominal" and thermal_state(60.0) == "fair"
    assert thermal_state(50.0, fair_c=45.0) == "fair"


GOOD = DeviceState(charging=True, battery_frac=0.5, idle_s=3600.0, thermal="nominal", screen_on=False)


@pytest.mark.parametrize("state, reason", [
    (DeviceState(charging=False, battery_frac=0.5, idle_s=3600.0), "not charging (requires external power)"),
    (DeviceState(charging=None), "charging state unknown (requires external power)"),
    (DeviceState(charging=True, screen_on=True, idle_s=0.0), "screen on"),
    (DeviceState(charging=True, idle_s=60.0), "idle 60s < 900s"),
    (DeviceState(charging=True, idle_s=3600.0, battery_frac=0.1), "battery 10% < 15%"),
    (DeviceState(charging=True, idle_s=3600.0, thermal="serious"), "thermal serious above fair"),
])
def test_idle_and_charging_refuses_with_the_reason(state: DeviceState, reason: str) -> None:
    d = IdleAndCharging().decide(state, SleepPressure(wake_steps=100))
    assert not d.sleep and d.reason == reason and d.steps is None


def test_idle_and_charging_sleeps_one_step_per_wake_step() -> None:
    policy = IdleAndCharging()
    assert policy.decide(GOOD, SleepPressure(wake_steps=300)).steps == 300
    assert policy.decide(GOOD, SleepPressure(wake_steps=10)).steps == 50  # min_steps
    assert not policy.decide(GOOD, SleepPressure(wake_steps=0)).sleep
    resume = policy.decide(GOOD, SleepPressure(wake_steps=0, pending_night=True))
    assert resume.sleep and resume.steps is None
    # a headless board: nothing says idle or screen; allowed unless the policy asks to know
    board = DeviceState(charging=True)
    assert policy.decide(board, SleepPressure(wake_steps=5)).sleep
    assert not IdleAndCharging(assume_idle_when_unknown=False).decide(board, SleepPressure(wake_steps=5)).sleep


def test_adaptive_policy_scales_the_night_with_the_drop() -> None:
    policy = AdaptivePolicy()
    no_drop = policy.decide(GOOD, SleepPressure(wake_steps=200, accuracy_drop=0.0))
    big_drop = policy.decide(GOOD, SleepPressure(wake_steps=200, accuracy_drop=0.25))
    half = policy.decide(GOOD, SleepPressure(wake_steps=200, accuracy_drop=0.05))
    assert (no_drop.steps, half.steps, big_drop.steps) == (100, 250, 400)
    low = policy.decide(GOOD, SleepPressure(wake_steps=5, accuracy_drop=0.0))
    assert not low.sleep and low.reason.startswith("low pressure")
    assert policy.decide(GOOD, SleepPressure(wake_steps=5, accuracy_drop=0.2)).sleep
    assert not policy.decide(DeviceState(charging=False), SleepPressure(wake_steps=500, accuracy_drop=0.5)).sleep


def test_policy_configs_report_every_problem() -> None:
    with pytest.raises(ConfigError) as e:
        IdleAndCharging(min_idle_s=-1, min_battery_frac=2.0, max_thermal="hot", steps_per_wake_step=0)
    assert len(e.value.problems) == 4 and "max_thermal='hot'" in str(e.value)
    with pytest.raises(ConfigError, match="min_ratio=3"):
        AdaptivePolicy(min_ratio=3.0, max_ratio=2.0)


def test_probe_set_measures_the_drop_and_round_trips(tmp_path: Path) -> None:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", store_config=StoreConfig(capacity_records=64),
                   wake=WakeConfig(train="all", lr=0.1, replay_batch=0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    for _ in range(30):
        es.learn(x, y)
    probe = ProbeSet(size=32, seed=1)
    probe.refresh(es)
    assert probe.slots.size == 32 and probe.baseline is not None and probe.drop(es) == 0.0
    stored = es.store.read(probe.slots)
    with torch.no_grad():  # destroy the model: the probe set sees it
        for p in es.model.parameters():
            p.zero_()
    dropped = probe.drop(es)
    assert dropped is not None and dropped > 0
    pred = es.record_logits(stored.x).argmax(1)
    assert probe.baseline - float((pred == stored.y).float().mean()) == pytest.approx(dropped)
    again = ProbeSet(size=1, seed=5)
    again.load_state_dict(probe.state_dict())
    assert again.size == 32 and (again.slots == probe.slots).all() and again.baseline == probe.baseline
    es.store.close()
