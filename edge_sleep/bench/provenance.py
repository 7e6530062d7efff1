"""Where a benchmark's result came from: the commit it was made at, and the sources it ran.

Every results file under ``benchmarks/results/`` records ``commit`` (the ``git`` commit of the
code that wrote it), ``commit_dirty`` (whether tracked files other than ``benchmarks/results/``, what benchmarks write,
differed from that commit: a benchmark that writes its plots before its JSON stays clean) and
``sources_sha256`` (a hash of the package's own source files as they were, :func:`sources_sha256`),
so a reader can tell whether the numbers describe the code in front of them, even from an
installed copy without git; a result is regenerated when the numerics change.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

__all__ = ["machine", "provenance", "sources_sha256"]

_SOURCE_SUFFIXES = (".py", ".c", ".h", ".cpp", ".hpp", ".txt", ".cmake")


def sources_sha256(package: str | Path | None = None) -> str:
    """SHA-256 over the package's source files (``edge_sleep/``: Python, C and C++ and their build
    files), each as its path relative to the package and its bytes, in sorted order; compiled
    files and caches are not sources."""
    root = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES
                       and "__pycache__" not in p.parts):
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def machine() -> dict[str, str]:
    """What a float result depends on beyond the code: the CPU's model name, a hash of its feature
    flags (AVX2, AVX-512, ...) and the kernels PyTorch picked for them. The same code on another
    CPU runs other vectorised kernels (and MKL paths), whose rounding differs in the last bits,
    and SGD carries such bits into accuracies that differ in the third decimal."""
    import platform

    import torch

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:  # not Linux: the name platform gives, no flags
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    return {"cpu": model, "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def provenance(root: str | Path | None = None) -> dict[str, str | bool | None]:
    """``{"commit": sha or None, "commit_dirty": bool or None, "sources_sha256": hex}`` of the
    repository at ``root`` and of the package's sources.

    ``None`` values where ``root`` is not in a git repository or ``git`` is missing (an installed
    package run outside its checkout).

    Example:
        >>> sorted(provenance())
        ['commit', 'commit_dirty', 'sources_sha256']
    """
    cwd = Path(root) if root is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results") \
        if commit else None
    return {"commit": commit, "commit_dirty": None if status is None else bool(status),
            "sources_sha256": sources_sha256()}
