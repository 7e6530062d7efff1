from __future__ import annotations

from pathlib import Path

import torch

from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.bench.datasets import permuted_mnist
from edge_sleep.bench.pmnist import evaluate, mlp
from tests.conftest import small_mlp


def test_pruned_weights_stay_zero_across_wakes_and_sleeps(tmp_path: Path) -> None:
    for train in ("all", "adapters"):
        es = EdgeSleep(small_mlp(), store=tmp_path / f"{train}.db", wake=WakeConfig(train=train),
                       sleep=SleepConfig(min_steps=20, prune_frac=0.1, sparsity_cap=0.5))
        seen_pruned: dict[str, torch.Tensor] = {}
        for night in range(4):
            for _ in range(5):
                es.learn(torch.randn(16, 8), torch.randint(0, 3, (16,)))
            report = es.sleep()
            assert report.completed and report.pruned > 0
            params = dict(es.model.named_parameters())
            for name, mask in es.masks.items():
                assert torch.all(params[name][~mask] == 0)
                if name in seen_pruned:  # once pruned, always pruned
                    assert not torch.any(seen_pruned[name] & mask)
                seen_pruned[name] = ~mask
        assert 0.3 < report.sparsity <= 0.5


def test_preempted_sleep_resumes_to_the_same_result(tmp_path: Path) -> None:
    def trained(name: str) -> EdgeSleep:
        torch.manual_seed(1)
        es = EdgeSleep(small_mlp(), store=tmp_path / f"{name}.db", wake=WakeConfig(train="all"),
                       sleep=SleepConfig(min_steps=0, check_every=10, fisher_steps=40), seed=3)
        g = torch.Generator().manual_seed(2)
        for _ in range(100):
            es.learn(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
        return es

    whole = trained("a")
    r = whole.sleep()
    assert r.completed and r.steps == 100

    parts = trained("b")
    calls = iter([False, True])  # wake up at the second check
    first = parts.sleep(should_stop=lambda: next(calls, False))
    assert not first.completed and first.steps == 20
    parts.save(tmp_path / "ckpt")  # the night's progress survives a restart
    parts.store.close()
    resumed = EdgeSleep.load(tmp_path / "ckpt", small_mlp())
    second = resumed.sleep()
    assert second.completed and second.steps == 80
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v)


def test_sleep_reduces_forgetting_on_two_tasks(tmp_path: Path) -> None:
    tasks = permuted_mnist(2, seed=0, train_per_task=4000, test_per_task=2000)

    def first_task_accuracy(sleep: bool) -> float:
        es = EdgeSleep(mlp(0), store=tmp_path / f"s{sleep}.db", store_config=StoreConfig(capacity_records=500),
                       wake=WakeConfig(train="all", lr=0.1, replay_batch=0),
                       sleep=SleepConfig(steps_per_wake_step=2.0), seed=0)
        for task in tasks:
            for x, y in task.batches(128):
                es.learn(x, y)
            if sleep:
                es.sleep()
        return evaluate(es, tasks[0])

    without, with_sleep = first_task_accuracy(False), first_task_accuracy(True)
    assert with_sleep > without + 0.03, (without, with_sleep)
