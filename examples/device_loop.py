"""Export a model's on-device programs and run the loop through them: predict, learn, sleep, ship.

    python examples/device_loop.py [--out DIR] [--quick]

1. The base the app ships: an MLP trained on upright MNIST digits. A day and a night in eager
   torch: LoRA adapters on the frozen base learn digits turned by some angle; the night merges
   them into the base and anchors what it learned.
2. ``export_programs`` writes what an app ships (``infer.pte`` + ``weights.ptd``, ``train.pte`` +
   ``train.ptd``, ``consolidate.pte``, ``manifest.json``), and ``load_program`` runs ``infer.pte``
   through ExecuTorch: its logits match eager torch.
3. The same checkpoint on the ExecuTorch engine (``engine="executorch"``): the next day (digits
   turned by another angle) runs its wake steps through ``train.pte`` and its predictions through
   ``infer.pte``; a night on torch; then the programs are exported again. The manifest's hashes show what a night changes: the ``.ptd``
   weight files, never a ``.pte`` program, so a night ships as weights only.

``--quick`` uses fewer images and leaves ``consolidate.pte`` out (what the tests run). Each export
lowers with ExecuTorch and takes seconds to tens of seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from edge_sleep import EdgeSleep, SleepConfig, WakeConfig
from edge_sleep.bench.datasets import rotated_mnist
from edge_sleep.bench.pmnist import mlp
from edge_sleep.export import export_programs, load_program


def hashes(folder: Path) -> dict[str, str]:
    """``{file: sha256}`` from an export folder's manifest."""
    return {name: entry["sha256"] for name, entry in json.loads((folder / "manifest.json").read_text())["files"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the exports (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="fewer images (what the tests run)")
    args = parser.parse_args(argv)
    per_task = 2048 if args.quick else 16000
    out = args.out or Path(tempfile.mkdtemp(prefix="edge-sleep-device-"))
    tasks = rotated_mnist(3, 0, train_per_domain=per_task, test_per_domain=500)
    base = mlp(0)  # the base the app ships with: plain SGD on the upright digits
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    for x, y in tasks[0].batches(64):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(base(x), y).backward()
        optimizer.step()
    wake = WakeConfig(train="adapters", lora_rank=8, replay_batch=0)  # train.pte without replay inputs

    # 1. a day in eager torch
    es = EdgeSleep(base, store=out / "replay.db", wake=wake, sleep=SleepConfig(min_steps=20), seed=0)
    for x, y in tasks[1].batches(64):
        es.learn(x, y)
    es.sleep()  # the first night, in eager torch: it merges the adapters and sets the anchor
    x_eval, _ = tasks[1].evaluation()

    # 2. what the app ships, and inference through ExecuTorch
    manifest = export_programs(es, None, out / "day1", int8=False, onnx=False, consolidate=not args.quick,
                               night=not args.quick)
    program = load_program(out / "day1", "infer")
    gap = float((program(x_eval[:64]) - es.logits(x_eval[:64])).abs().max())
    print(f"exported {sorted(manifest.files)} to {out / 'day1'}")
    print(f"infer.pte against eager torch: largest logit difference {gap:.1e}")

    # 3. the same checkpoint on the ExecuTorch engine: day 2 through train.pte, a night, a re-export
    es.save(out / "ckpt")
    es.store.close()
    device = EdgeSleep.load(out / "ckpt", mlp(0), engine="executorch")
    for x, y in tasks[2].batches(64):
        stats = device.learn(x, y)  # one call of train.pte, clipped and guarded, per batch
    acc = ", ".join(f"{t.name} {float((device.predict(t.evaluation()[0]) == t.evaluation()[1]).float().mean()):.3f}"
                    for t in tasks)
    print(f"day 2 through train.pte: last loss {stats.loss:.3f}; accuracy: {acc}")
    report = device.sleep()
    # the same export after a night (its id passed on): only the weights files may change
    export_programs(device, None, out / "day2", int8=False, onnx=False, consolidate=not args.quick,
                    night=not args.quick, export_id=manifest.export_id)
    device.store.close()
    before, after = hashes(out / "day1"), hashes(out / "day2")
    changed = sorted(n for n in before if before[n] != after[n])
    print(f"night: {report.steps} replay steps; files the night changed: {changed}")
    ships_weights_only = all(n.endswith(".ptd") for n in changed)
    print("a night ships as weights only:", ships_weights_only)
    return 0 if ships_weights_only and gap <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
