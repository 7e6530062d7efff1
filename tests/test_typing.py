"""The package type-checks (it ships py.typed, so users' checkers read these hints).

mypy runs in a child process: run in the test process (``mypy.api.run``) it left about 4.6 million
objects and 3 GB resident behind it, which every later garbage collection, and the interpreter's
exit, walked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_mypy_finds_no_errors() -> None:
    pytest.importorskip("mypy")
    package = Path(__file__).resolve().parents[1] / "edge_sleep"
    done = subprocess.run([sys.executable, "-m", "mypy", str(package), "--ignore-missing-imports", "--no-incremental"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
