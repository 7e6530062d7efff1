"""Do the default LoRA adapters survive a domain-incremental stream? ``python benchmarks/adapters_stability.py``

The scenario a new user tries first: a base trained on upright MNIST digits, then nine more
domains (the digits turned by distinct multiples of 18 degrees) learned through
``WakeConfig(train="adapters")`` with its defaults, wake replay on, no nights. It runs the stream
with the defaults edge-sleep shipped first (lr 0.1, anchor 10.0, LoRA scale 2, no clipping), with
gradient clipping at norm 1.0 added, and with today's (the tuned lr 0.4 and anchor 3.0, clipped at
1.0), on six seeds, and counts the runs that collapse
(final average accuracy under 0.2: chance is 0.1) and the wake steps the non-finite guard undid.
Writes benchmarks/results/adapters_stability.json (about 4 minutes on 2 cores); the ± is the sample
standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edge_sleep import EdgeSleep, StoreConfig, WakeConfig
from edge_sleep.bench.datasets import rotated_mnist
from edge_sleep.bench.metrics import sample_std
from edge_sleep.bench.pmnist import mlp
from edge_sleep.bench.provenance import provenance

VARIANTS = {
    "before: lr 0.1, no clipping": {"lr": 0.1, "anchor_lambda": 10.0, "max_grad_norm": None},
    "clipping: lr 0.1, clipping at 1.0": {"lr": 0.1, "anchor_lambda": 10.0},
    "default: lr 0.4, anchor 3.0, clipping at 1.0": {},
}


def run(args: tuple[str, int]) -> dict[str, Any]:
    variant, seed = args
    torch.set_num_threads(1)
    domains = rotated_mnist(10, seed, train_per_domain=5000, test_per_domain=2000)
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # the base: three passes over the upright domain
        for x, y in domains[0].batches(128):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    evals = [d.evaluation() for d in domains]
    with tempfile.TemporaryDirectory() as tmp:
        es = EdgeSleep(model, store=Path(tmp) / "r.db", store_config=StoreConfig(capacity_records=500),
                       wake=WakeConfig(**VARIANTS[variant]), seed=seed)  # type: ignore[arg-type]
        base_acc = float(np.mean([float((es.predict(x) == y).float().mean()) for x, y in evals[:1]]))
        curve = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # counted below instead
            for i, domain in enumerate(domains[1:], start=1):
                for x, y in domain.batches(128):
                    es.learn(x, y, stream=domain.name)
                accs = [float((es.predict(x) == y).float().mean()) for x, y in evals[: i + 1]]
                curve.append(float(np.mean(accs)))
        es.store.close()
    return {"variant": variant, "seed": seed, "upright_acc_before": base_acc, "final_avg_acc": curve[-1],
            "min_avg_acc": min(curve), "avg_acc_after_each_domain": curve, "skipped_steps": es.skipped_steps,
            "collapsed": curve[-1] < 0.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapters_stability.json"))
    args = parser.parse_args()
    jobs = [(v, s) for v in VARIANTS for s in args.seeds]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(run, jobs)
    summary = {}
    for v in VARIANTS:
        rs = [r for r in results if r["variant"] == v]
        summary[v] = {"collapsed_runs": sum(r["collapsed"] for r in rs), "runs": len(rs),
                      "final_avg_acc_mean": float(np.mean([r["final_avg_acc"] for r in rs])),
                      "final_avg_acc_std": sample_std([r["final_avg_acc"] for r in rs]),
                      "skipped_steps": sum(r["skipped_steps"] for r in rs)}
        print(f"{v:36s} collapsed {summary[v]['collapsed_runs']}/{len(rs)}, final average accuracy "
              f"{summary[v]['final_avg_acc_mean']:.3f} ± {summary[v]['final_avg_acc_std']:.3f}, "
              f"guard undid {summary[v]['skipped_steps']} steps")
    payload = {"stream": "rotated MNIST, 10 domains x 5000 images, base trained on domain 0",
               "summary": summary, "runs": results, "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload.update(provenance())  # the commit the numbers describe
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
