"""The simulated fleet and ``edge-sleep fleet simulate`` (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_sleep.cli import main
from edge_sleep.fleet.simulate import FleetSimulation, charging_nights, client_tasks, format_report, simulate_fleet

_SMALL = dict(clients=2, rounds=2, tasks=4, tasks_per_client=2, examples_per_day=256, test_per_task=100,
              sleep_steps=5)


@pytest.mark.parametrize(("changes", "match"), [
    ({"clients": 0}, "clients=0"), ({"tasks_per_client": 30}, "tasks_per_client=30 > tasks=20"),
    ({"tasks_per_client": 5, "rounds": 3}, "tasks_per_client=5 > rounds=3"), ({"mode": "solo"}, "mode='solo'"),
    ({"min_fraction": 0.0}, "min_fraction=0.0"), ({"epsilon": -1.0}, "epsilon=-1.0"), ({"train": "lora"}, "train='lora'"),
])
def test_a_bad_simulation_is_refused_with_the_value(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FleetSimulation(**changes)  # type: ignore[arg-type]


def test_each_client_has_its_own_tasks_and_charging_nights() -> None:
    config = FleetSimulation(clients=6, rounds=10, tasks=20, tasks_per_client=5)
    tasks = client_tasks(config)
    assert all(len(set(t)) == 5 and all(0 <= x < 20 for x in t) for t in tasks)
    assert len({tuple(sorted(t)) for t in tasks}) > 1  # non-identical
    assert client_tasks(config) == tasks  # the seed fixes them
    nights = charging_nights(config)
    assert nights.shape == (6, 10) and 0.5 < nights.mean() < 1.0  # the S24 misses about one night in ten
    board = charging_nights(FleetSimulation(clients=3, rounds=4, tasks_per_client=2, profile="raspberry-pi-5"))
    assert board.all()  # a board on mains is always on the charger


def test_alone_each_client_learns_its_days_and_the_report_says_so(tmp_path: Path) -> None:
    report = simulate_fleet(FleetSimulation(mode="alone", **_SMALL), tmp_path / "clients")  # type: ignore[arg-type]
    assert [c["client"] for c in report["clients"]] == [0, 1] and report["rounds"] == []
    for c in report["clients"]:
        assert len(c["task_acc"]) == 4 and c["energy_j"] > 0
        seen = sum(c["task_acc"][t] for t in c["tasks"]) / 2
        assert seen > 0.3  # it learned its own tasks (chance is 0.1)
        assert c["unseen_acc"] == pytest.approx(sum(a for t, a in enumerate(c["task_acc"]) if t not in c["tasks"]) / 2)
    assert "2 clients x 2 rounds" in format_report(report)
    with pytest.raises(ValueError, match="is not empty"):
        simulate_fleet(FleetSimulation(mode="alone", **_SMALL), tmp_path / "clients")  # type: ignore[arg-type]


def test_the_command_refuses_bad_input_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "simulate", "--clients", "0", "--out", str(tmp_path / "a")]) == 2
    assert "clients=0; expected an int >= 1" in capsys.readouterr().err
    assert main(["fleet", "simulate", "--profile", "no-such-phone", "--out", str(tmp_path / "b")]) == 2
    assert "no such profile" in capsys.readouterr().err
    (tmp_path / "c" / "clients").mkdir(parents=True)
    assert main(["fleet", "simulate", "--out", str(tmp_path / "c")]) == 2
    assert "holds a fleet's clients/ already" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_simulates_a_fleet_on_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", root)
    out = tmp_path / "sim"
    assert main(["fleet", "simulate", "--clients", "3", "--rounds", "2", "--tasks", "4", "--tasks-per-client", "2",
                 "--examples-per-day", "256", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "fleet.png").stat().st_size > 0
    assert [r["merged"] + r["absent"] for r in report["rounds"]] == [3, 3]  # every client asked, every round
    assert 0 < report["bytes_per_round"] < report["full_weights_bytes"] / 5  # rank-8 int8 changes
    assert report["avg_acc"] > 0.2
    assert "round 1:" in capsys.readouterr().out
