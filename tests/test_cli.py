from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep, WakeConfig
from edge_sleep.cli import main
from tests.conftest import small_mlp


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


# ----------------------------------------------------------------- refused input: one line, exit code 2
MODEL = "tests.conftest:small_mlp"


def _checkpoint(folder: Path) -> Path:
    """A small checkpoint that has learned (so export gets as far as writing its folder) and a held-out file."""
    es = EdgeSleep(small_mlp(), store=folder / "r.db", wake=WakeConfig(train="all", replay_batch=0))
    g = torch.Generator().manual_seed(0)
    es.learn(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    es.save(folder / "ckpt")
    es.store.close()
    torch.save({"x": torch.randn(20, 8, generator=g), "y": torch.randint(0, 3, (20,), generator=g)},
               folder / "heldout.pt")
    return folder / "ckpt"


def _truncate(ckpt: Path) -> str:
    raw = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(raw[: len(raw) // 2])
    return str(ckpt / "state.pt")


def _drop_state(ckpt: Path) -> str:
    (ckpt / "state.pt").unlink()
    return str(ckpt / "state.pt")


def _garble_config(ckpt: Path) -> str:
    (ckpt / "config.json").write_text("{not json")
    return str(ckpt / "config.json")


def _file_at(path: Path) -> str:
    path.write_text("a file in the way")
    return str(path)


PROC = Path("/proc/edge-sleep-no-such-folder")  # nothing can be created under /proc, not even by root

# (case, setup(tmp, ckpt) -> the path the message must name, argv(tmp, ckpt))
REFUSED: list[tuple[str, Callable[[Path, Path], str], Callable[[Path, Path], list[str]]]] = [
    ("export: truncated state.pt", lambda t, c: _truncate(c),
     lambda t, c: ["export", str(c), "--out", str(t / "out"), "--model", MODEL]),
    ("export: missing state.pt", lambda t, c: _drop_state(c),
     lambda t, c: ["export", str(c), "--out", str(t / "out"), "--model", MODEL]),
    ("export: config.json not JSON", lambda t, c: _garble_config(c),
     lambda t, c: ["export", str(c), "--out", str(t / "out"), "--model", MODEL]),
    ("export: --out is a file", lambda t, c: _file_at(t / "out"),
     lambda t, c: ["export", str(c), "--out", str(t / "out"), "--model", MODEL]),
    ("export: --out under /proc", lambda t, c: str(PROC),
     lambda t, c: ["export", str(c), "--out", str(PROC), "--model", MODEL]),
    ("export: --out under a file", lambda t, c: str(t / "heldout.pt"),
     lambda t, c: ["export", str(c), "--out", str(t / "heldout.pt" / "out"), "--model", MODEL]),
    ("export: --model not MODULE:CALLABLE", lambda t, c: "nocolon",
     lambda t, c: ["export", str(c), "--out", str(t / "out"), "--model", "nocolon"]),
    ("watch: truncated state.pt", lambda t, c: _truncate(c),
     lambda t, c: ["watch", str(c), "--model", MODEL, "--polls", "1", "--poll-s", "0.01"]),
    ("audit: truncated state.pt", lambda t, c: _truncate(c),
     lambda t, c: ["audit", str(c), "--model", MODEL, "--heldout", str(t / "heldout.pt")]),
    ("audit: --heldout garbage", lambda t, c: _file_at(t / "garbage.pt"),
     lambda t, c: ["audit", str(c), "--model", MODEL, "--heldout", str(t / "garbage.pt")]),
    ("simulate: --out is a file", lambda t, c: _file_at(t / "sim"),
     lambda t, c: ["simulate", "--profile", "galaxy-s24", "--days", "1", "--out", str(t / "sim")]),
    ("simulate: --out under /proc", lambda t, c: str(PROC),
     lambda t, c: ["simulate", "--profile", "galaxy-s24", "--days", "1", "--out", str(PROC)]),
    ("demo: unknown --profile", lambda t, c: "nonexistent",
     lambda t, c: ["demo", "--profile", "nonexistent", "--out", str(t / "demo.png")]),
    ("demo: unknown --profile, --days 0", lambda t, c: "nonexistent",
     lambda t, c: ["demo", "--profile", "nonexistent", "--days", "0", "--out", str(t / "demo.png")]),
    ("demo: --out under /proc", lambda t, c: str(PROC),
     lambda t, c: ["demo", "--out", str(PROC / "demo.png")]),
]


@pytest.mark.parametrize(("case", "setup", "argv"), REFUSED, ids=[case for case, _, _ in REFUSED])
def test_refused_input_is_one_line_naming_the_file_with_exit_code_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str,
        setup: Callable[[Path, Path], str], argv: Callable[[Path, Path], list[str]]) -> None:
    if "/proc" in case and not Path("/proc/self").exists():
        pytest.skip("needs Linux's /proc")
    import edge_sleep.bench.datasets
    import edge_sleep.export
    import edge_sleep.simulate.day

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{case}: the work started before the input was checked")

    # each case must fail before the expensive part: ExecuTorch lowering, the demo's training, the simulation
    monkeypatch.setattr(edge_sleep.export, "to_infer_program", never)
    monkeypatch.setattr(edge_sleep.bench.datasets, "permuted_mnist", never)
    monkeypatch.setattr(edge_sleep.simulate.day, "simulate", never)
    ckpt = _checkpoint(tmp_path)
    named = setup(tmp_path, ckpt)
    capsys.readouterr()
    rc = main(argv(tmp_path, ckpt))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, f"{case}: exit code {rc}, stderr {err!r}"
    assert len(err.splitlines()) == 1, f"{case}: {err!r}"
    command = argv(tmp_path, ckpt)[0]
    assert err.startswith(f"edge-sleep {command}: ") and named in err and "Fix" in err, f"{case}: {err!r}"
    assert "Traceback" not in captured.err + captured.out
    if case == "export: --out is a file":
        assert (tmp_path / "out").read_text() == "a file in the way"  # nothing replaced or moved aside
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="needs a user the permission bits apply to (root writes anywhere)")
def test_export_to_a_read_only_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import edge_sleep.export

    monkeypatch.setattr(edge_sleep.export, "to_infer_program", lambda *a, **k: pytest.fail("lowering started"))
    ckpt = _checkpoint(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["export", str(ckpt), "--out", str(locked / "out"), "--model", MODEL]) == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(locked / "out") in err and "Fix" in err
