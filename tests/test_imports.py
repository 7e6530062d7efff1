"""The package's import graph has no cycle, and the engines sit below the runtime.

Every ``import`` of an ``edge_sleep`` module counts: at module level, inside a function (a lazy
import) and under ``TYPE_CHECKING``, since each is a dependency of the design all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "edge_sleep"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` (a package is its ``__init__``)."""
    modules: dict[str, Path] = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = f

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith(package.name))
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{f}: relative import; the package uses absolute imports"
                if node.module and node.module.startswith(package.name):
                    for a in node.names:  # `from pkg import submodule` depends on the submodule
                        full = f"{node.module}.{a.name}"
                        deps.add(full if full in modules else owner(node.module))
        graph[name] = {d for d in deps if d is not None and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engines_and_exports_do_not_import_the_runtime() -> None:
    graph = import_graph()
    below = [m for m in graph if m.startswith(("edge_sleep.engines", "edge_sleep.export"))]
    assert below and not [m for m in below if "edge_sleep.runtime" in graph[m]]


def test_the_runtime_is_a_learner_and_its_engine_an_engine() -> None:
    from edge_sleep import EdgeSleep
    from edge_sleep.engines import Engine, Learner, TorchEngine
    from edge_sleep.engines.executorch_engine import ExecuTorchEngine

    es = EdgeSleep(nn.Sequential(nn.Linear(4, 3)))
    assert isinstance(es, Learner) and isinstance(es._engine, TorchEngine)
    assert isinstance(es._engine, Engine) and isinstance(ExecuTorchEngine(), Engine)
    assert not isinstance(torch.zeros(1), Learner)
