"""The exported programs: ExecuTorch (infer.pte, infer_int8.pte, .ptd) and ONNX, against eager torch.

Lowering is slow (about 20 s for everything), so one trained runtime is exported once per session
and shared; each test copies the folder before damaging it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.bench.datasets import permuted_mnist
from edge_sleep.bench.pmnist import mlp
from edge_sleep.errors import CallOrderError, EdgeSleepError, ExportError, FormatVersionError, InputError
from edge_sleep.export import export_onnx, export_programs, load_program, read_manifest
from edge_sleep.export.manifest import sha256_of

pytestmark = pytest.mark.export


@dataclass
class Exported:
    es: EdgeSleep
    first: Path  # int8 + onnx, exported after the first day
    second: Path  # exported after a night (with pruning) and a second day, fp32 only
    first_logits: torch.Tensor  # eager logits on `held_out` at the first export
    held_out: torch.Tensor


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.manual_seed(0)
    tasks = permuted_mnist(2, 0, train_per_task=2048, test_per_task=1000)
    es = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=4, lr=0.1),
                   sleep=SleepConfig(min_steps=30, prune_frac=0.1), seed=0)
    for x, y in tasks[0].batches(64):
        es.learn(x, y)
    held_out, _ = tasks[0].evaluation()
    root = tmp_path_factory.mktemp("export")
    export_programs(es, None, root / "first")
    first_logits = es.logits(held_out).detach().clone()
    es.sleep()
    for x, y in tasks[1].batches(64):
        es.learn(x, y)
    export_programs(es, held_out[:8], root / "second", int8=False, onnx=False)
    return Exported(es, root / "first", root / "second", first_logits, held_out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_the_folder_holds_what_the_manifest_says(exported: Exported) -> None:
    m = read_manifest(exported.first)
    names = {p.name for p in exported.first.iterdir()}
    assert names == {"infer.pte", "weights.ptd", "infer_int8.pte", "weights_int8.ptd", "train.pte",
                     "train.ptd", "consolidate.pte", "model.onnx", "manifest.json"}
    assert set(m.files) == names - {"manifest.json"}
    assert m.fingerprint == exported.es.fingerprint and m.input_shape == [784] and m.input_dtype == "float32"
    assert m.num_classes == 10 and m.max_batch == 64
    assert m.lora == {"rank": 4, "alpha": 16.0, "targets": ["0", "2", "4"]}
    assert m.adapters == ["0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b", "4.lora_a", "4.lora_b"]
    assert m.max_replay == 128 and m.programs["train"] == {"pte": "train.pte", "ptd": "train.ptd"}
    # weights live in the .ptd, the program is small; int8 weights are about 4x smaller
    assert m.files["infer.pte"]["bytes"] < 20_000 < 300_000 < m.files["weights.ptd"]["bytes"]
    assert m.files["weights_int8.ptd"]["bytes"] < m.files["weights.ptd"]["bytes"] / 3


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_infer_pte_matches_eager(exported: Exported, batch: int) -> None:
    program = load_program(exported.second)
    x = exported.held_out[:batch]
    assert (program(x) - exported.es.logits(x)).abs().max().item() <= 1e-5


def test_infer_int8_agrees_with_eager_argmax(exported: Exported) -> None:
    program = load_program(exported.first, "infer_int8")
    x = exported.held_out
    pred = torch.cat([program(x[i:i + 64]) for i in range(0, len(x), 64)]).argmax(1)
    agree = (pred == exported.first_logits.argmax(1)).float().mean().item()
    assert agree >= 0.99, agree


def test_onnx_matches_eager_through_onnxruntime(exported: Exported) -> None:
    import onnx
    import onnxruntime as ort

    path = exported.first / "model.onnx"
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 33):
        x = exported.held_out[:batch]
        (out,) = session.run(None, {"x": x.numpy()})
        assert abs(out - exported.first_logits[:batch].numpy()).max() <= 1e-5


def test_a_night_changes_only_the_weights_files(exported: Exported, tmp_path: Path) -> None:
    a, b = read_manifest(exported.first), read_manifest(exported.second)
    for program, weights in (("infer.pte", "weights.ptd"), ("train.pte", "train.ptd")):
        assert a.files[program]["sha256"] == b.files[program]["sha256"], program
        assert a.files[weights]["sha256"] != b.files[weights]["sha256"], weights
    assert exported.es.masks, "the night should have pruned (the program must not depend on masks)"
    # the unchanged first program, with only the new weights file: the current model, in one
    # process that still holds the old program (no cache of old weights by name)
    from executorch.runtime import Runtime

    old = load_program(exported.first)
    x = exported.held_out[:16]
    assert (old(x) - exported.first_logits[:16]).abs().max().item() <= 1e-5
    method = Runtime.get().load_program(exported.first / "infer.pte",
                                        data_path=exported.second / "weights.ptd").load_method("forward")
    assert (method.execute([x])[0] - exported.es.logits(x)).abs().max().item() <= 1e-5


def test_bad_inputs_are_refused_before_running(exported: Exported) -> None:
    program = load_program(exported.second)
    with pytest.raises(InputError, match=r"shape \(2, 10\)"):
        program(torch.zeros(2, 10))
    with pytest.raises(InputError, match="dtype torch.float64"):
        program(torch.zeros(2, 784, dtype=torch.float64))
    with pytest.raises(InputError, match="batch of 65"):
        program(torch.zeros(65, 784))
    with pytest.raises(InputError, match="NaN or inf"):
        program(torch.full((1, 784), float("nan")))
    with pytest.raises(InputError, match="list"):
        program([0.0] * 784)  # type: ignore[arg-type]


def test_damaged_folders_name_the_file(exported: Exported, tmp_path: Path) -> None:
    truncated = _copy(exported.first, tmp_path / "truncated")
    data = (truncated / "infer.pte").read_bytes()
    (truncated / "infer.pte").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"infer\.pte.*does not match the manifest"):
        load_program(truncated)

    # the weights of another export (a .ptd from another model or version) in place of ours
    swapped = _copy(exported.first, tmp_path / "swapped")
    shutil.copy(exported.second / "weights.ptd", swapped / "weights.ptd")
    with pytest.raises(ExportError, match=r"weights\.ptd.*from another export"):
        load_program(swapped)

    missing = _copy(exported.first, tmp_path / "missing")
    (missing / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest"):
        load_program(missing)

    newer = _copy(exported.first, tmp_path / "newer")
    raw = json.loads((newer / "manifest.json").read_text())
    raw["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(FormatVersionError):
        load_program(newer)

    garbled = _copy(exported.first, tmp_path / "garbled")
    (garbled / "manifest.json").write_text("{not json")
    with pytest.raises(ExportError, match="not a readable manifest"):
        load_program(garbled)

    with pytest.raises(ExportError, match="no inference program 'nope'"):
        load_program(exported.first, "nope")
    with pytest.raises(ExportError, match="engine='executorch'"):
        load_program(exported.first, "train")


def test_a_pte_that_executorch_refuses_is_an_export_error(exported: Exported, tmp_path: Path) -> None:
    # a program whose bytes match a (rewritten) manifest but that ExecuTorch cannot parse
    bad = _copy(exported.first, tmp_path / "bad")
    (bad / "infer.pte").write_bytes(b"\0" * 64)
    m = read_manifest(bad)
    m.files["infer.pte"] = {"sha256": sha256_of(b"\0" * 64), "bytes": 64}
    m.write(bad)
    with pytest.raises(ExportError, match=r"could not load .*infer\.pte"):
        load_program(bad)


def test_export_refuses_bad_arguments_and_keeps_the_old_folder(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(CallOrderError, match="learn"):
        export_programs(EdgeSleep(mlp(0)), None, tmp_path / "x")
    with pytest.raises(InputError, match="example_input has per-example shape"):
        export_programs(exported.es, torch.zeros(2, 10), tmp_path / "x")
    with pytest.raises(InputError, match="max_batch=1"):
        export_programs(exported.es, None, tmp_path / "x", max_batch=1)
    for bad in (2, -1, True, 4.0):
        with pytest.raises(InputError, match=rf"max_replay={bad!r}; expected 0 \(no replay inputs\) or"):
            export_programs(exported.es, None, tmp_path / "x", max_replay=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="expected an EdgeSleep"):
        export_programs(torch.nn.Linear(2, 2), None, tmp_path / "x")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
    assert all(isinstance(e, EdgeSleepError) for e in (ExportError("x"), InputError("x")))


def test_export_onnx_writes_one_checked_file(exported: Exported, tmp_path: Path) -> None:
    import onnxruntime as ort

    path = export_onnx(exported.es, None, tmp_path / "m.onnx", max_batch=8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = exported.held_out[:8]
    (out,) = session.run(None, {"x": x.numpy()})
    assert abs(out - exported.es.logits(x).numpy()).max() <= 1e-5


@pytest.mark.slow
def test_cli_exports_a_checkpoint(exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_sleep.cli import main

    exported.es.save(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--no-int8",
                 "--no-onnx", "--etrecord"]) == 0
    assert "infer.pte" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out").programs["infer"]["etrecord"] == "infer.etrecord"
    # the per-operator profile, with the ETRecord naming what ran inside XNNPACK
    assert main(["profile", str(tmp_path / "out" / "infer.pte"), "--runs", "3"]) == 0
    table = capsys.readouterr().out
    assert "3 runs at batch 1" in table and "p50 (ms)" in table and "XnnpackBackend" in table
    assert main(["profile", str(exported.second), "--runs", "2", "--batch", "4"]) == 0  # no ETRecord
    # the largest batch, many runs: timings only (a debug buffer for outputs ran out and aborted)
    assert main(["profile", str(exported.second), "--runs", "200", "--batch", "64"]) == 0
    assert "Method::execute" in capsys.readouterr().out
    assert main(["profile", str(tmp_path / "nothing.txt")]) == 2
    assert "neither a .pte file nor an export folder" in capsys.readouterr().err
    assert main(["profile", str(exported.second), "--batch", "65"]) == 2
    assert "batch=65" in capsys.readouterr().err
    # same model, same weights: the same program and weights as the library call
    want = read_manifest(exported.second).files
    got = read_manifest(tmp_path / "out").files
    assert got["infer.pte"] == want["infer.pte"] and got["weights.ptd"] == want["weights.ptd"]
    for model, message in (("nocolon", "MODULE:CALLABLE"), ("tests.conftest:small_mlp", "fingerprint"),
                           ("no.such:thing", "cannot import")):
        assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o2"), "--model", model]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o2").exists()


def test_consolidate_pte_prunes_and_strengthens_like_the_torch_night(exported: Exported) -> None:
    from edge_sleep.config import SleepConfig
    from edge_sleep.export import load_consolidate
    from edge_sleep.kernels import prune_count, significance
    from edge_sleep.sleep import consolidate_weights_

    program = load_consolidate(exported.first)
    es = exported.es
    cfg = SleepConfig(prune_frac=0.2, strengthen_frac=0.05, strengthen_eta=0.1)
    for name in ("0.weight", "4.weight"):
        w = es.model.get_parameter(name).detach().clone()
        f = es.anchor.fisher[name].clone()
        keep = es.masks[name].clone()
        assert (~keep).any(), "the fixture's night pruned some weights already"
        weights, masks = {name: w.clone()}, {name: keep.clone()}
        consolidate_weights_(weights, {name: f}, masks, cfg)
        k = prune_count(w.numel(), int((~keep).sum()), cfg.prune_frac, cfg.sparsity_cap)
        if name == "0.weight":  # pixels that are always 0: thousands of live weights tie at s = 0
            s = significance(f, w)
            assert int((s[keep] == 0).sum()) > k > 0
        rank = w.numel() - int(cfg.strengthen_frac * w.numel())
        new_w, new_keep, pruned, strong = program(w, f, keep, prune=k, strengthen_rank=rank, eta=cfg.strengthen_eta)
        assert torch.equal(new_keep, masks[name]) and torch.equal(new_w, weights[name])
        assert pruned == k and strong > 0
    with pytest.raises(InputError, match="expected one shape"):
        program(torch.zeros(3), torch.zeros(4), torch.ones(3, dtype=torch.bool), prune=1, strengthen_rank=None, eta=0.1)
    with pytest.raises(InputError, match=">= 0"):
        program(torch.ones(3), -torch.ones(3), torch.ones(3, dtype=torch.bool), prune=1, strengthen_rank=None, eta=0.1)


@pytest.mark.parametrize("int8", [False, True])
def test_an_export_keeps_no_reference_to_the_model(int8: bool) -> None:
    """torch.export, PT2E and ExecuTorch keep module-level state that held every exported model
    alive, weights included (edge_sleep.export.release); the export functions release it."""
    import gc
    import weakref

    from edge_sleep.export import to_infer_program

    def export() -> weakref.ref[torch.Tensor]:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
        to_infer_program(model, torch.zeros(2, 8), int8=int8)
        return weakref.ref(model[0].weight)

    weight = export()
    gc.collect()
    assert weight() is None, "an export kept the model's weights alive"
