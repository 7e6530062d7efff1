"""Learn and sleep with your own model: a small CNN on rotated MNIST digits, one domain a day.

    python examples/learn_and_sleep.py [--out DIR] [--quick]

Each day the app sees digits turned by a new angle and learns from them (``learn``: one wake
step per batch, every batch offered to the on-disk replay store); each night it sleeps (``sleep``:
replay with consolidation noise, the Fisher, the anchor that protects the next day). After each
night it prints the accuracy on every domain seen so far, so you can see what was kept. At the
end it saves the runtime, loads it into a fresh model and checks that the predictions are the
same. ``--quick`` runs two small days (what the tests run); the default runs three days of 4,000
images each.

Copy it and change ``make_model`` and ``days``: any ``nn.Module`` whose forward returns logits
``(B, C)`` works.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.bench.datasets import rotated_mnist


def make_model() -> nn.Module:
    """Your model: here a small CNN on flattened 28x28 images (B, 784) -> logits (B, 10)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),                  # (B, 784) -> (B, 1, 28, 28)
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # -> (B, 8, 14, 14)
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> (B, 16, 7, 7)
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def accuracy(es: EdgeSleep, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((es.predict(x) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the store and the checkpoint "
                        "(default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="two small days (what the tests run)")
    args = parser.parse_args(argv)
    days, per_day, night_min = (2, 512, 16) if args.quick else (3, 4000, 50)
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="edge-sleep-example-"))
    out.mkdir(parents=True, exist_ok=True)

    # setup: the model, a 500-record store on disk, all weights trained by day (a small model)
    es = EdgeSleep(make_model(), store=out / "replay.db", store_config=StoreConfig(capacity_records=500),
                   wake=WakeConfig(train="all", replay_batch=32), sleep=SleepConfig(min_steps=night_min), seed=0)
    domains = rotated_mnist(days, seed=0, train_per_domain=per_day, test_per_domain=500)

    for day, domain in enumerate(domains):
        for x, y in domain.batches(32):                    # the day: learn from what the app sees
            es.learn(x, y, stream=domain.name)
        steps = es.planned_sleep_steps()                   # the night, with a progress bar
        with tqdm(total=steps, desc=f"night {day + 1}", leave=False) as bar:
            report = es.sleep(should_stop=lambda: False, progress=bar.update)
        seen = [f"{d.name} {accuracy(es, *d.evaluation()):.3f}" for d in domains[:day + 1]]
        print(f"day {day + 1}: {report.steps} replay steps; accuracy: " + ", ".join(seen))

    # save, then load into a fresh model of the same architecture: same predictions, same store
    x_eval, _ = domains[0].evaluation()
    before = es.predict(x_eval)
    es.save(out / "ckpt")
    es.store.close()
    back = EdgeSleep.load(out / "ckpt", make_model())
    same = bool(torch.equal(back.predict(x_eval), before))
    print(f"saved to {out / 'ckpt'}; reloaded: same predictions: {same}, {len(back.store)} stored records")
    back.store.close()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
