from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_sleep import (CallOrderError, ConfigError, EdgeSleep, FingerprintMismatchError,
                        FormatVersionError, InputError, SleepConfig, StoreConfig, StorePathError,
                        WakeConfig)
from tests.conftest import small_mlp


def runtime(tmp_path: Path, **kw: object) -> EdgeSleep:
    return EdgeSleep(small_mlp(), store=tmp_path / "r.db", sleep=SleepConfig(min_steps=10), **kw)  # type: ignore[arg-type]


def snapshot(es: EdgeSleep) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in es.model.state_dict().items()}


def test_learn_trains_only_adapters_by_default(tmp_path: Path) -> None:
    es = runtime(tmp_path)
    base = es.model[0].weight.clone()
    stats = es.learn(torch.randn(8, 8), torch.randint(0, 3, (8,)))
    assert stats.batch == 8 and stats.stored == 8 and stats.loss > 0
    assert torch.equal(es.model[0].weight, base)
    assert es.model[0].lora_b.abs().sum() > 0


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(4, 7), torch.zeros(4, dtype=torch.long), r"shape \(7,\).*\(8,\)"),
        (torch.full((4, 8), float("nan")), torch.zeros(4, dtype=torch.long), "NaN or inf in 4 of 4"),
        (torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), "label 3 is out of range"),
        (torch.randn(4, 8), torch.tensor([0, -1, 2, 1]), "label -1"),
        (torch.randn(4, 8), torch.zeros(4), "integer tensor"),
        (torch.randn(4, 8), torch.zeros(5, dtype=torch.long), r"expected \(4,\)"),
        ([[0.0] * 8], torch.zeros(1, dtype=torch.long), "torch.Tensor"),
        (torch.randn(0, 8), torch.zeros(0, dtype=torch.long), "non-empty"),
        (torch.randint(0, 3, (4, 8)), torch.zeros(4, dtype=torch.long), "integer dtype"),
        (torch.randn(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long), r"float64.*x.to\(torch.float32\)"),
        (torch.randn(4, 8).half(), torch.zeros(4, dtype=torch.long), "dtype torch.float16; this model computes in"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path, x: object, y: object, match: str) -> None:
    es = runtime(tmp_path)
    es.learn(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    before, n = snapshot(es), len(es.store)
    with pytest.raises(InputError, match=match):
        es.learn(x, y)  # type: ignore[arg-type]
    after = snapshot(es)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(es.store) == n and es.store.seen == 4


def test_config_errors_are_reported_together() -> None:
    with pytest.raises(ConfigError) as e:
        SleepConfig(lr=-1.0, prune_frac=2.0, batch_size=0)
    assert len(e.value.problems) == 3 and "lr=-1.0" in str(e.value)
    with pytest.raises(ValueError):
        WakeConfig(train="everything")  # type: ignore[arg-type]


def test_unknown_noise_layer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        EdgeSleep(small_mlp(), sleep=SleepConfig(noise_layers=("nope",)))


def test_store_of_another_model_is_refused(tmp_path: Path) -> None:
    es = runtime(tmp_path)
    es.learn(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    es.store.close()
    with pytest.raises(FingerprintMismatchError):
        EdgeSleep(small_mlp(d_in=9), store=tmp_path / "r.db")


def test_unwritable_store_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(StorePathError, match="writable"):
        EdgeSleep(small_mlp(), store=tmp_path / "f" / "r.db")


def test_sleep_before_learning_is_a_call_order_error(tmp_path: Path) -> None:
    with pytest.raises(CallOrderError, match="learn"):
        runtime(tmp_path).sleep(steps=5)


def test_save_load_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    es = runtime(tmp_path)
    for _ in range(5):
        es.learn(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    es.sleep()
    es.learn(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    x = torch.randn(32, 8)
    es.save(tmp_path / "ckpt")
    es.store.close()
    loaded = EdgeSleep.load(tmp_path / "ckpt", small_mlp())
    torch.testing.assert_close(loaded.logits(x), es.logits(x), rtol=0, atol=0)
    assert loaded.masks.keys() == es.masks.keys() and loaded.anchor.fisher.keys() == es.anchor.fisher.keys()
    assert loaded.wake_steps_since_sleep == 1


def test_newer_state_is_refused(tmp_path: Path) -> None:
    es = runtime(tmp_path)
    es.learn(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    state = es.state_dict()
    with pytest.raises(FormatVersionError):
        es.load_state_dict({**state, "format_version": 99})


def test_latent_replay_stores_hidden_states(tmp_path: Path) -> None:
    es = EdgeSleep(small_mlp(), store=tmp_path / "r.db", wake=WakeConfig(train="all"),
                   store_config=StoreConfig(latent_layer="1"), sleep=SleepConfig(min_steps=5))
    es.learn(torch.randn(8, 8), torch.randint(0, 3, (8,)))
    assert es.store.read(torch.arange(8).numpy()).x.shape == (8, 16)
    assert es.sleep().completed


def test_latent_layer_needs_sequential() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    with pytest.raises(ConfigError, match="nn.Sequential"):
        EdgeSleep(Net(), store_config=StoreConfig(latent_layer="fc"))


def test_load_of_a_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CallOrderError, match="nowhere"):
        EdgeSleep.load(tmp_path / "nowhere", small_mlp())


def test_load_recovers_from_a_crash_between_renames(tmp_path: Path) -> None:
    es = runtime(tmp_path)
    es.learn(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    es.save(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # the state save() leaves if killed mid-way
    es.store.close()
    loaded = EdgeSleep.load(tmp_path / "ckpt", small_mlp())
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded.logits(x), es.logits(x))


def test_a_store_object_of_another_model_is_refused(tmp_path: Path) -> None:
    from edge_sleep import ReplayStore

    store = ReplayStore(tmp_path / "r.db")
    EdgeSleep(small_mlp(), store=store)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        EdgeSleep(small_mlp(d_in=5), store=store)


def test_a_model_without_parameters_is_a_config_error() -> None:
    from edge_sleep.errors import ConfigError

    with pytest.raises(ConfigError, match="no parameters"):
        EdgeSleep(torch.nn.Identity())


def test_save_heals_a_crash_between_its_renames(tmp_path: Path) -> None:
    """A crash after the old checkpoint moved aside and before the new one moved in."""
    es = EdgeSleep(small_mlp(), wake=WakeConfig(train="all"))
    es.learn(torch.randn(8, 8), torch.randint(0, 3, (8,)))
    es.save(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")  # what the crash leaves
    back = EdgeSleep.load(tmp_path / "ckpt", small_mlp())  # load finds the previous checkpoint
    x = torch.randn(4, 8)
    assert torch.equal(back.logits(x), es.logits(x))
    es.save(tmp_path / "ckpt")  # and the next save succeeds and cleans up
    assert (tmp_path / "ckpt" / "state.pt").exists() and not (tmp_path / ".ckpt.old").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
