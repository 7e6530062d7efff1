"""The package type-checks (it ships py.typed, so users' checkers read these hints)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_mypy_finds_no_errors() -> None:
    api = pytest.importorskip("mypy.api")
    package = Path(__file__).resolve().parents[1] / "edge_sleep"
    stdout, stderr, status = api.run([str(package), "--ignore-missing-imports", "--no-incremental"])
    assert status == 0, stdout + stderr
