"""engine="executorch": wake steps through train.pte and predictions through infer.pte, against eager torch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from edge_sleep import ConfigError, EdgeSleep, InputError, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.bench.datasets import permuted_mnist
from edge_sleep.bench.pmnist import mlp
from edge_sleep.export import export_programs

pytestmark = pytest.mark.export


def _runtime(engine: str) -> EdgeSleep:
    torch.manual_seed(0)
    return EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=4, replay_batch=16),
                     sleep=SleepConfig(min_steps=10, prune_frac=0.1), seed=0, engine=engine)


def _adapters(es: EdgeSleep) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in es.model.named_parameters() if ".lora_" in n}


@pytest.mark.slow
def test_both_engines_take_the_same_wake_steps_and_nights(tmp_path: Path) -> None:
    """Two days (replay, then an anchor and pruning masks from the first night) on both engines."""
    tasks = permuted_mnist(2, 0, train_per_task=256, test_per_task=200)
    eager, et = _runtime("torch"), _runtime("executorch")
    worst_loss = 0.0
    for day, task in enumerate(tasks):
        for x, y in task.batches(64):
            a, b = eager.learn(x, y), et.learn(x, y)
            assert a.skipped is None and b.skipped is None and a.stored == b.stored
            assert a.replayed == b.replayed
            for key in ("loss", "new_loss", "replay_loss", "penalty", "grad_norm"):
                worst_loss = max(worst_loss, abs(getattr(a, key) - getattr(b, key)))
        assert worst_loss <= 1e-5, worst_loss
        wa, wb = _adapters(eager), _adapters(et)
        assert max((wa[n] - wb[n]).abs().max().item() for n in wa) <= 1e-5
        x_eval, _ = task.evaluation()
        assert et._engine is not None and et._engine.serving_from == "train.pte"  # the adapters moved
        assert (eager.logits(x_eval) - et.logits(x_eval)).abs().max().item() <= 1e-5
        if day == 1:
            assert eager.anchor and eager.masks, "day 2 should run with an anchor and masks"
        # a fresh adapter's A is drawn from torch's global generator when a night merges
        torch.manual_seed(day)
        eager.sleep()
        torch.manual_seed(day)
        et.sleep()
        # the night ran on torch; the engine writes its weights into the .ptd files, no export
        assert (eager.logits(x_eval) - et.logits(x_eval)).abs().max().item() <= 1e-5
        assert et._engine.serving_from == "infer.pte"
        if day == 0:  # the weights written in place are, byte for byte, what an export writes
            fresh = tmp_path / "fresh"
            export_programs(et, None, fresh, int8=False, onnx=False, consolidate=False, night=False,
                            max_batch=et._engine.max_batch, max_replay=et._engine.manifest.max_replay,
                            export_id=et._engine.manifest.export_id)
            for name in ("infer.pte", "weights.ptd", "train.pte", "train.ptd"):
                assert (fresh / name).read_bytes() == (et._engine.directory / name).read_bytes(), name
    assert et._engine.rebuilds == 1 and et._engine.weight_writes == 2


def test_engine_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match="engine='gpu'"):
        EdgeSleep(mlp(0), engine="gpu")
    with pytest.raises(ConfigError, match="adapters only"):
        EdgeSleep(mlp(0), wake=WakeConfig(train="all"), engine="executorch")
    with pytest.raises(ConfigError, match="latent_layer=None"):
        EdgeSleep(mlp(0), wake=WakeConfig(train="adapters"), store_config=StoreConfig(latent_layer="2"),
                  engine="executorch")


@pytest.mark.slow  # two exports of train.pte (the second after a load), about a minute
def test_engine_refuses_a_batch_too_large_and_guards_steps(tmp_path: Path) -> None:
    es = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=2, replay_batch=0), engine="executorch")
    es.learn(torch.rand(8, 784), torch.randint(0, 10, (8,)))
    before = _adapters(es)
    stored = len(es.store)
    with pytest.raises(InputError, match="at most 256"):
        es.learn(torch.rand(257, 784), torch.randint(0, 10, (257,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        huge = (1e38 * torch.tensor([1.0, -1.0]).repeat(392)).expand(4, 784)  # inf - inf inside: NaN
        stats = es.learn(huge, torch.zeros(4, dtype=torch.long))
    assert (stats.skipped or "").startswith("non-finite") and any("undid a wake step" in str(w.message) for w in caught)
    after = _adapters(es)
    assert all(torch.equal(before[n], after[n]) for n in before) and len(es.store) == stored
    # the engine is recorded with the checkpoint and the reloaded runtime predicts the same
    x = torch.rand(300, 784)  # more than one program call
    want = es.logits(x)
    es.save(tmp_path / "ckpt")
    back = EdgeSleep.load(tmp_path / "ckpt", mlp(0))
    assert back.engine == "executorch"
    assert (back.logits(x) - want).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_a_runtime_that_never_replays_gets_a_program_without_replay_inputs() -> None:
    """replay_batch=0: train.pte takes (x, y) only, and still takes the eager engine's steps."""
    tasks = permuted_mnist(1, 0, train_per_task=192, test_per_task=50)
    cfg = WakeConfig(train="adapters", lora_rank=4, replay_batch=0)
    eager, et = (EdgeSleep(mlp(0), wake=cfg, seed=0, engine=e) for e in ("torch", "executorch"))
    for x, y in tasks[0].batches(64):
        a, b = eager.learn(x, y), et.learn(x, y)
        for key in ("loss", "new_loss", "replay_loss", "penalty", "grad_norm"):
            assert abs(getattr(a, key) - getattr(b, key)) <= 1e-5, key
    assert et._engine is not None and et._engine.manifest is not None and et._engine.manifest.max_replay == 0
    wa, wb = _adapters(eager), _adapters(et)
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) <= 1e-5
    # a wake config that replays cannot run through this program: refused before anything moves
    et.wake_config = WakeConfig(train="adapters", lora_rank=4, replay_batch=16)
    stored, steps = len(et.store), et.wake_steps_since_sleep
    with pytest.raises(InputError, match="without replay inputs"):
        et.learn(*next(tasks[0].batches(8)))
    assert len(et.store) == stored and et.wake_steps_since_sleep == steps
    assert all(torch.equal(wb[n], p) for n, p in _adapters(et).items())
    # after a night the engine keeps the same program (not one with replay inputs), new weights in
    et.sleep()
    with pytest.raises(InputError, match="without replay inputs"):
        et.learn(*next(tasks[0].batches(8)))
    assert et._engine.manifest.max_replay == 0 and et._engine.rebuilds == 1 and et._engine.weight_writes == 1


@pytest.mark.slow
def test_a_replay_batch_above_the_programs_bound_is_refused_before_anything_moves() -> None:
    es = EdgeSleep(mlp(0), wake=WakeConfig(train="adapters", lora_rank=2, replay_batch=8), seed=0, engine="executorch")
    x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
    es.learn(x, y)
    assert es._engine is not None and es._engine.manifest is not None and es._engine.manifest.max_replay == 8
    before, stored, state = _adapters(es), len(es.store), es.store.state_dict()
    es.wake_config = WakeConfig(train="adapters", lora_rank=2, replay_batch=32)
    with pytest.raises(InputError, match="replay_batch=32.*at most 8"):
        es.learn(x, y)
    assert len(es.store) == stored and all(torch.equal(before[n], p) for n, p in _adapters(es).items())
    assert es.store.state_dict() == state  # its generator did not move
