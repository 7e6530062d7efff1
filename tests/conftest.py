"""Shared fixtures, and the two test tiers.

``pytest`` runs the fast tier (a few minutes on 2 cores): every module's unit tests, the store,
the night, small exports, the CLI's error paths. ``pytest --full`` adds the tests marked ``slow``
(ExecuTorch lowering of transformers and the engine conformance runs, the tests on
``test_export``'s trained export, whose lowerings take about 2.5 minutes, the demo, the crash
loops, the type check, the documentation build); CI runs ``pytest --full``.
``pytest --long`` adds the ``long`` tests too (the whole MiniLM encoder and GPT-2 on both engines,
about 10 minutes), which CI does not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edge-sleep")
    group.addoption("--full", action="store_true", help="also run the tests marked slow (what CI runs)")
    group.addoption("--long", action="store_true", help="also run the tests marked slow and long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    long_ = bool(config.getoption("--long"))
    full = long_ or bool(config.getoption("--full"))
    skip_slow = pytest.mark.skip(reason="slow: run with pytest --full")
    skip_long = pytest.mark.skip(reason="long (minutes of lowering): run with pytest --long")
    for item in items:
        if "exported" in getattr(item, "fixturenames", ()):  # test_export's shared export: minutes of lowering
            item.add_marker(pytest.mark.slow)
        if "long" in item.keywords and not long_:
            item.add_marker(skip_long)
        elif "slow" in item.keywords and not full:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_mlp(d_in: int = 8, hidden: int = 16, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def run_first_python_block(page: Path) -> None:
    """Run the first ```python block of ``page`` (the README's or the docs' example) in the current
    folder, and check what it promises: predictions for 5 inputs, a completed night, a store file
    and a checkpoint on disk."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(page), "exec"), namespace)
    assert namespace["labels"].shape == (5,)  # type: ignore[attr-defined]
    assert namespace["report"].completed  # type: ignore[attr-defined]
    assert os.path.exists("replay.db") and os.path.isdir("ckpt")
