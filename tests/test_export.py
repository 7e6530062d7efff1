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
    export_programs(es, None, root / "first", night=False)  # night.pte: the slow tier's own export
    first_logits = es.logits(held_out).detach().clone()
    es.sleep()
    for x, y in tasks[1].batches(64):
        es.learn(x, y)
    # the same export again after a night (its id passed on): only the .ptd files may change
    export_programs(es, held_out[:8], root / "second", int8=False, onnx=False, night=False,
                    export_id=read_manifest(root / "first").export_id)
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


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of another architecture (784-10, inference only): its .ptd holds other tensors."""
    torch.manual_seed(1)
    es = EdgeSleep(torch.nn.Sequential(torch.nn.Linear(784, 10)), seed=1)
    es.learn(torch.rand(8, 784), torch.arange(8))
    out = tmp_path_factory.mktemp("foreign") / "export"
    export_programs(es, None, out, int8=False, onnx=False, train=False, consolidate=False, night=False)
    return out


def test_every_program_and_ptd_carries_the_export_id(exported: Exported) -> None:
    from executorch.runtime import Runtime

    m = read_manifest(exported.first)
    assert len(m.export_id) == 32 and read_manifest(exported.second).export_id == m.export_id
    for name, files in m.programs.items():
        if "pte" not in files:
            continue  # onnx
        ptd = exported.first / files["ptd"] if "ptd" in files else None
        program = Runtime.get().load_program(exported.first / files["pte"], data_path=ptd)
        assert program.load_method("export_id").execute([]) == [m.export_id], name
        assert set(m.signatures[name]) <= set(program.method_names), name
        if ptd is not None:
            (stored,) = program.load_method("weights_id").execute([])
            assert bytes(stored.numpy()) == m.export_id.encode(), name
    assert m.dims == {"batch": [1, 64], "distill": [1, 128], "label": [1, 128], "numel": [2, 78_400]}
    assert m.night == {} and "night.pte" not in m.files  # exported with night=False
    with pytest.raises(InputError, match="export_id='xyz'; expected 32 lowercase hex"):
        export_programs(exported.es, None, exported.first.parent / "never", export_id="xyz")


# a child process runs the loads: were ExecuTorch to crash on the bad files, the test fails instead
# of taking the test run down with it (one child for all, as importing ExecuTorch takes seconds)
_CHILD = """
import sys
from pathlib import Path
from edge_sleep.errors import ExportError
from edge_sleep.export import load_program, read_manifest
from edge_sleep.export.runner import open_program
args = sys.argv[1:]
for folder, name in zip(args[::2], args[1::2]):
    folder = Path(folder)
    try:
        open_program(folder, read_manifest(folder), name) if name == "train" else load_program(folder, name)
    except ExportError as e:
        print("REFUSED", str(e).replace(chr(10), " "), flush=True)
    else:
        print("LOADED", flush=True)
"""


def _load_in_child(cases: list[tuple[Path, str]]) -> list[str]:
    """One line a case ``(folder, program)``: ``LOADED`` or ``REFUSED <the error>``."""
    import subprocess
    import sys

    args = [str(a) for case in cases for a in case]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(cases), proc.stdout
    return lines


def _swap(folder: Path, name: str, source: Path) -> None:
    """Put ``source`` at ``folder / name`` and re-hash the manifest, as someone copying files would."""
    shutil.copy(source, folder / name)
    m = read_manifest(folder)
    m.files[name] = {"sha256": sha256_of((folder / name).read_bytes()), "bytes": (folder / name).stat().st_size}
    m.write(folder)


def test_files_of_another_export_are_refused_before_they_run(exported: Exported, foreign: Path,
                                                              tmp_path: Path) -> None:
    ours = read_manifest(exported.first).export_id
    theirs = read_manifest(foreign).export_id
    # another architecture's weights under a re-hashed manifest: refused by the id, not run
    ptd = _copy(exported.first, tmp_path / "ptd")
    _swap(ptd, "weights.ptd", foreign / "weights.ptd")
    # the same for the training program, whose .ptd is replaced by an inference .ptd
    train = _copy(exported.first, tmp_path / "train")
    _swap(train, "train.ptd", foreign / "weights.ptd")
    # another export's program with our weights
    pte = _copy(exported.first, tmp_path / "pte")
    _swap(pte, "infer.pte", foreign / "infer.pte")
    # a missing .ptd, with and without its manifest entry
    missing = _copy(exported.first, tmp_path / "missing")
    (missing / "weights.ptd").unlink()
    unlisted = _copy(missing, tmp_path / "unlisted")
    m = read_manifest(unlisted)
    del m.files["weights.ptd"]
    m.write(unlisted)
    out = _load_in_child([(ptd, "infer"), (train, "train"), (pte, "infer"), (missing, "infer"),
                          (unlisted, "infer"), (exported.first, "infer")])
    assert out[0].startswith("REFUSED") and "weights.ptd" in out[0] and theirs in out[0], out[0]
    assert "another export" in out[0], out[0]
    assert out[1].startswith("REFUSED") and "train.ptd" in out[1] and "another export" in out[1], out[1]
    assert out[2].startswith("REFUSED") and "infer.pte" in out[2] and theirs in out[2] and ours in out[2], out[2]
    assert out[3].startswith("REFUSED") and "weights.ptd" in out[3] and "missing" in out[3], out[3]
    assert out[4].startswith("REFUSED") and "weights.ptd" in out[4], out[4]
    assert out[5] == "LOADED"  # the untouched folder, in the same child


def test_a_manifest_that_disagrees_with_its_programs_is_refused(exported: Exported, tmp_path: Path) -> None:
    cases = {
        "input shape": lambda m: m.signatures["infer"]["forward"]["inputs"][0].__setitem__("shape", ["batch", 785]),
        "input dtype": lambda m: m.signatures["infer"]["forward"]["inputs"][0].__setitem__("dtype", "int64"),
        "bound": lambda m: m.dims.__setitem__("batch", [1, 128]),
        "outputs": lambda m: m.signatures["train"]["step"]["outputs"].pop(),
        "method": lambda m: m.signatures["infer"].__setitem__("backward", m.signatures["infer"]["forward"]),
        "export id": lambda m: setattr(m, "export_id", "0" * 32),
    }
    for case, edit in cases.items():
        bad = _copy(exported.first, tmp_path / case.replace(" ", "_"))
        m = read_manifest(bad)
        edit(m)
        m.write(bad)
        with pytest.raises(ExportError, match="manifest") as info:
            if case == "outputs":
                from edge_sleep.export.runner import open_program

                open_program(bad, read_manifest(bad), "train")
            else:
                load_program(bad)
        assert "Fix:" in str(info.value), case
    # an export by an older edge-sleep (no ids in its files)
    old = _copy(exported.first, tmp_path / "old")
    raw = json.loads((old / "manifest.json").read_text())
    raw["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError, match="format_version=2: an export by an older edge-sleep"):
        load_program(old)


@pytest.mark.slow
def test_the_cpp_loop_of_the_docs_runs_the_folder(exported: Exported, foreign: Path, tmp_path: Path) -> None:
    """examples/cpp_loop: the loop docs/on-device.md shows, built with CMake against the wheel's
    C++ SDK: wake steps through train.pte (adapters kept by the app), predictions, and a foreign
    .ptd refused before it is read."""
    import re
    import subprocess

    import executorch

    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C++17 compiler")
    source = Path(__file__).resolve().parents[1] / "examples" / "cpp_loop"
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={executorch.__path__[0]}"], check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, timeout=600)
    run = subprocess.run([str(build / "cpp_loop"), str(exported.first), "12"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    steps = re.findall(r"step (\d+) loss ([\d.]+) status (\d+)", run.stdout)
    assert len(steps) == 12 and all(status == "0" for *_, status in steps), run.stdout
    losses = [float(loss) for _, loss, _ in steps]
    assert losses[-1] < 0.5 * losses[0], losses  # the app's adapters learn the batch
    assert "logits 2 x 10, forward 2 x 10" in run.stdout
    bad = _copy(exported.first, tmp_path / "swapped")
    _swap(bad, "weights.ptd", foreign / "weights.ptd")
    run = subprocess.run([str(build / "cpp_loop"), str(bad)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "refused: weights.ptd holds the weights of export" in run.stderr, run.stderr


@pytest.mark.slow
def test_night_pte_takes_the_torch_nights_replay_step(exported: Exported, tmp_path: Path) -> None:
    """night.pte's replay_step against one step of the torch night's Phase 1 (the library's
    ConsolidationNoise, replay_loss, SGD and keep-masks), and fisher_step against fisher_sums; the
    masks lie in night.ptd at the offsets its layout records."""
    import copy

    from edge_sleep.adapters import merge_lora_
    from edge_sleep.export import learned_tensors
    from edge_sleep.export.layout import Layout, patch
    from edge_sleep.export.night import noise_shapes
    from edge_sleep.export.runner import open_program
    from edge_sleep.sleep import ConsolidationNoise, apply_masks_, replay_loss

    es = exported.es
    folder = tmp_path / "night"
    m = export_programs(es, None, folder, int8=False, onnx=False, train=False, consolidate=False)
    data = (folder / "night.ptd").read_bytes()
    assert patch(data, Layout.from_json(m.layouts["night.ptd"]), learned_tensors(es, "night.ptd")) == data
    assert m.night["weights"] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    method = open_program(folder, m, "night").load_method("replay_step")
    model = copy.deepcopy(es.model)
    merge_lora_(model)  # what a night starts with
    params = {n: p for n, p in model.named_parameters() if n in m.night["weights"]}
    x, y = exported.held_out[:32], torch.arange(32) % 10
    target = torch.randn(32, 10, generator=torch.Generator().manual_seed(1))
    cfg = es.sleep_config
    hyper = torch.tensor([cfg.lr, cfg.label_weight, 0.5, cfg.noise_std])
    generator = torch.Generator().manual_seed(2)
    copy_of = torch.Generator().set_state(generator.get_state())
    noise = [torch.randn(shape, generator=copy_of) for shape in noise_shapes(model, es.noise_layers, x)]
    weights = [p.detach().clone() for p in params.values()]
    loss, status, *new = method.execute([x, y, target, hyper, *noise, *weights])
    # the torch night's step, drawing the same noise from the same generator state
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    hooks = ConsolidationNoise(model, es.noise_layers, cfg.noise_std, generator)
    eager = replay_loss(model(x), y, target, cfg.label_weight, 0.5)
    eager.backward()
    hooks.remove()
    with torch.no_grad():
        for p in params.values():
            p -= cfg.lr * p.grad
        apply_masks_(params, es.masks)
    assert int(status) == 0 and abs(float(loss) - float(eager.detach())) <= 1e-5
    for got, (name, want) in zip(new, params.items()):
        assert (got - want).abs().max().item() <= 1e-5, name
    pruned = ~es.masks["0.weight"]
    assert pruned.any() and bool((new[0][pruned] == 0).all())  # pruned weights stay zero
    # the Fisher of the weights after the step: the library's per-sample sums, 20 records padded
    # to the program's fixed batch (fisher_batch) with rows that add nothing
    from edge_sleep.fisher import fisher_sums

    f = m.night["fisher_batch"]
    n = 20
    pad = f - n
    fisher = open_program(folder, m, "night").load_method("fisher_step")
    rows = [torch.cat([t[:n], torch.zeros((pad, *t.shape[1:]), dtype=t.dtype)]) for t in (x, y, target)]
    valid = torch.cat([torch.ones(n), torch.zeros(pad)])
    start = [torch.rand_like(w) for w in new]
    sums = fisher.execute([*rows, valid, hyper, *new, *start])
    want = fisher_sums(model, list(params), x[:n], y[:n], target[:n],
                       lambda out, yy, tt: replay_loss(out, yy, tt, cfg.label_weight, 0.5))
    for got, s0, name in zip(sums, start, params):
        scale = float(want[name].abs().max())
        assert scale > 0 and float((got - s0 - want[name]).abs().max()) <= 1e-5 * scale, name
    # a non-finite record: the status says why (the night is then abandoned)
    bad = x.clone()
    bad[0, 0] = float("nan")
    loss, status, *_ = method.execute([bad, y, target, hyper, *noise, *weights])
    assert int(status) == 1


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
    # same model, same weights: the same program and weights as the library call, but for the
    # export id (a new export draws a new one; it is in both files)
    ids = read_manifest(tmp_path / "out").export_id.encode(), read_manifest(exported.second).export_id.encode()
    assert ids[0] != ids[1]
    for name in ("infer.pte", "weights.ptd"):
        got = (tmp_path / "out" / name).read_bytes()
        assert got.count(ids[0]) == 1 and got.replace(*ids) == (exported.second / name).read_bytes(), name
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
