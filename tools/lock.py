"""Regenerate ``requirements/dev.lock``: every package the tests run with, pinned.

    python tools/lock.py [--out requirements/dev.lock] [--python python3.11]

Makes a clean virtual environment in a temporary folder, installs the project there with its
``dev`` extra exactly as a new user would (``pip install -e ".[dev]"``, so every range in
``pyproject.toml`` resolves to the newest release the registry serves today), and writes
``pip freeze --all`` of it as the lock. Run it on purpose, when you mean to move to newer
releases, then run the whole test set (``pytest --full``) before committing the new lock.

``pyproject.toml`` keeps ranges for library users; the README's test command and ``.ci/run``
install with ``-c requirements/dev.lock``, so the tests always meet the versions they were last
run with. ``tests/test_lock.py`` checks that the lock satisfies ``pyproject.toml``.

A local version label (``torch==2.13.0+cpu``, the CPU build this machine's wheel folder
serves) is written without its label: ``torch==2.13.0`` still lets pip take the CPU build where
one is offered, and does not fail on a machine whose registry has only the plain release.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "edge-sleep"


def _run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout


def strip_local_label(line: str) -> str:
    """``name==1.0+cpu`` -> ``name==1.0``; other lines unchanged."""
    return re.sub(r"^([A-Za-z0-9_.\-]+==[^+\s;]+)\+[A-Za-z0-9.]+", r"\1", line)


def freeze_lines(frozen: str) -> list[str]:
    """The pinned lines of ``pip freeze --all`` output, without the project itself, sorted by name."""
    keep = []
    for line in frozen.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")):
            continue
        if "==" not in line:  # a direct reference (file://, git+): a lock must name a release
            raise SystemExit(f"pip freeze printed {line!r}, which is not a pinned release; expected "
                             "'name==version'. Fix: install that package from the registry.")
        if re.split(r"[=\s]", line, maxsplit=1)[0].lower().replace("_", "-") == PROJECT:
            continue
        keep.append(strip_local_label(line))
    return sorted(keep, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "requirements" / "dev.lock")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the lock is for")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-sleep-lock-") as tmp:
        venv = Path(tmp) / "venv"
        _run([args.python, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
        _run([py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"])
        _run([py, "-m", "pip", "check"])
        lines = freeze_lines(_run([py, "-m", "pip", "freeze", "--all"]))
        version = _run([py, "-c", "import platform; print(platform.python_version())"]).strip()
    header = [
        "# The environment the tests were run with: pip freeze --all of a clean venv after",
        '# pip install -e ".[dev]", written by tools/lock.py. Regenerate on purpose, never by hand.',
        f"# {datetime.date.today().isoformat()}, Python {version}, {platform.system()} {platform.machine()}",
        '# Use: pip install -c requirements/dev.lock -e ".[dev]"',
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {len(lines)} pins to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
