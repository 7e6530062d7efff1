"""The scripts in examples/ run, each in its quick mode, as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow


def run_example(name: str, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_learn_and_sleep(tmp_path: Path) -> None:
    out = run_example("learn_and_sleep.py", tmp_path)
    assert "day 1:" in out and "day 2:" in out and "rot0" in out
    assert "same predictions: True" in out and (tmp_path / "out" / "ckpt" / "state.pt").exists()


@pytest.mark.export
def test_device_loop(tmp_path: Path) -> None:
    out = run_example("device_loop.py", tmp_path)
    assert "files the night changed: ['train.ptd', 'weights.ptd']" in out
    assert "a night ships as weights only: True" in out
    assert (tmp_path / "out" / "day2" / "manifest.json").exists()


def test_simulate_week(tmp_path: Path) -> None:
    out = run_example("simulate_week.py", tmp_path)
    assert "Samsung Galaxy S24, 1 day(s)" in out
    assert (tmp_path / "out" / "report.json").exists() and (tmp_path / "out" / "timeline.png").stat().st_size > 10_000


def test_trainer_two_domains(tmp_path: Path) -> None:
    out = run_example("trainer_two_domains.py", tmp_path)
    assert "tweets " in out and "movies " in out and "records stored; nights: 8 steps in " in out
    assert "PEFT computes the runtime's logits: True" in out
    assert (tmp_path / "out" / "adapters" / "adapter_model.safetensors").exists()
