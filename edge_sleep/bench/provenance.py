"""Where a benchmark's result came from: the commit it was made at.

Every results file under ``benchmarks/results/`` records ``commit`` (the ``git`` commit of the
code that wrote it) and ``commit_dirty`` (whether tracked files differed from that commit), so a
reader can tell whether the numbers describe the code in front of them; a result is regenerated
when the numerics change.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["provenance"]


def provenance(root: str | Path | None = None) -> dict[str, str | bool | None]:
    """``{"commit": sha or None, "commit_dirty": bool or None}`` of the repository at ``root``.

    ``None`` values where ``root`` is not in a git repository or ``git`` is missing (an installed
    package run outside its checkout).

    Example:
        >>> sorted(provenance())
        ['commit', 'commit_dirty']
    """
    cwd = Path(root) if root is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "commit_dirty": None if status is None else bool(status)}
