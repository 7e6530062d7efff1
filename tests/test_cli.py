from __future__ import annotations

from pathlib import Path

import pytest

from edge_sleep.cli import main


@pytest.mark.slow
def test_demo_runs_and_writes_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--tasks", "2", "--train-per-task", "512", "--test-per-task", "200",
                 "--out", str(out), "--days", "1"]) == 0
    text = capsys.readouterr().out
    assert "wake only (no sleep)" in text and "wake + nightly sleep" in text and "after T2" in text
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    # the simulated day on the default phone: its table and its timeline beside the plot
    assert "Samsung Galaxy S24 (galaxy-s24), 1 day(s), fixed policy" in text and "night J" in text
    timeline = tmp_path / "demo-timeline.png"
    assert timeline.stat().st_size > 10_000 and timeline.read_bytes()[:4] == b"\x89PNG"


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--tasks", "0"])
    assert "--tasks=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--days", "-1"])
    assert "--days=-1" in capsys.readouterr().err
