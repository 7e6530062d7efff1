"""Differentially private class statistics and the dreams drawn from them (edge_sleep.dreams)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from edge_sleep import EdgeSleep
from edge_sleep.config import PrivacyConfig, SleepConfig, StoreConfig
from edge_sleep.dreams import (SHARES, StatsAccumulator, class_statistics, draw_dreams, release_statistics,
                               stats_noise, stats_sensitivities)
from edge_sleep.errors import ConfigError, InputError
from edge_sleep.privacy import GRID_STEPS, DeterministicNoiseWarning, compose_gaussian_epsilon

from .conftest import small_mlp


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0])
def test_the_three_blocks_together_are_one_release_at_epsilon_delta(epsilon: float) -> None:
    c, d = 3.0, 10
    noise = stats_noise(epsilon, 1e-5, c, d)
    sens = stats_sensitivities(c, d)
    assert sens["sums"] == pytest.approx(2 * c * (1 + math.sqrt(d) / (2 * GRID_STEPS)))
    assert sens["second"] == pytest.approx(c * c * (math.sqrt(2) + math.sqrt(55) / GRID_STEPS))
    # each block's sensitivity over its noise, squared and summed: the release's mu^2
    ratios = {b: sens[b] / getattr(noise, b) for b in SHARES}
    mu = math.sqrt(sum(r * r for r in ratios.values()))
    assert mu == pytest.approx(noise.mu, rel=1e-12)
    for block, share in SHARES.items():
        assert ratios[block] ** 2 == pytest.approx(share * mu * mu)
    # one Gaussian release with noise multiplier 1 / mu: Opacus' accountant says (epsilon, 1e-5), tightly
    assert compose_gaussian_epsilon(1 / mu, 1, 1e-5) <= epsilon
    assert compose_gaussian_epsilon(0.999 / mu, 1, 1e-5) > epsilon


def test_the_sensitivities_hold_for_clipped_rows() -> None:
    """||x x^T - y y^T||_F <= sqrt(2) C^2 and ||x - y|| <= 2C for rows clipped to C (the upper
    triangle, what is released, is no larger than the whole matrix)."""
    g = torch.Generator().manual_seed(0)
    acc = StatsAccumulator(2, (6,), 2.0)
    for _ in range(200):
        x = torch.randn(2, 6, generator=g, dtype=torch.float64) * torch.rand(1, generator=g, dtype=torch.float64) * 5
        a, b = StatsAccumulator(2, (6,), 2.0), StatsAccumulator(2, (6,), 2.0)
        a.add(x[:1], torch.tensor([0]))
        b.add(x[1:], torch.tensor([0]))
        up = torch.triu_indices(6, 6)
        d2 = (a.cells[""]["second"][0] - b.cells[""]["second"][0])[up[0], up[1]]
        assert float(d2.norm()) <= math.sqrt(2) * 4 * (1 + 1e-5)
        assert float((a.cells[""]["sums"][0] - b.cells[""]["sums"][0]).norm()) <= 4 * (1 + 1e-9)
    assert acc.examples == 0


def test_the_accumulator_sums_clipped_rows_per_stream_and_class_and_round_trips() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 1.0]])
    y = torch.tensor([1, 1, 0])
    acc = StatsAccumulator(3, (2,), 1.0)
    acc.add(x, y, stream="a")
    acc.add(x[:1], y[:1], stream="b")
    cell = acc.cells["a"]
    clipped = torch.tensor([[0.6, 0.8], [0.3, 0.4]], dtype=torch.float64)
    assert cell["counts"].tolist() == [1.0, 2.0, 0.0] and acc.examples == 4
    assert torch.allclose(cell["sums"][1], clipped.sum(0))
    assert torch.allclose(cell["second"][1].double(), clipped.T @ clipped, atol=1e-6)
    assert torch.allclose(cell["second"][0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    copy = StatsAccumulator.from_state_dict(acc.state_dict())
    assert copy.release_id == acc.release_id and copy.examples == 4
    assert all(torch.equal(copy.cells[s][n], acc.cells[s][n]) for s in acc.cells for n in acc.cells[s])
    before = acc.state_dict()
    with pytest.raises(InputError, match="expected 2"):
        acc.add(torch.ones(1, 3), torch.tensor([0]))
    with pytest.raises(InputError, match=r"expected \[0, 3\)"):
        acc.add(torch.ones(1, 2), torch.tensor([3]))
    assert all(torch.equal(before["cells"][s][n], acc.cells[s][n]) for s in acc.cells for n in acc.cells[s])
    first = acc.release_id
    acc.clear()
    assert acc.examples == 0 and acc.release_id != first


def test_an_accumulator_too_large_for_memory_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="latent_layer"):
        StatsAccumulator(100, (3, 64, 64), 1.0)


def test_exact_statistics_give_the_mean_and_covariance_and_dreams_follow_them() -> None:
    g = torch.Generator().manual_seed(1)
    d, n = 5, 4000
    basis = torch.randn(d, 2, generator=g)
    x = torch.randn(n, 2, generator=g) @ basis.T * 0.1 + torch.arange(d) * 0.1
    acc = StatsAccumulator(1, (d,), 100.0)  # nothing clipped
    acc.add(x, torch.zeros(n, dtype=torch.int64))
    cell = acc.cells[""]
    st = class_statistics("", 0, float(cell["counts"][0]), cell["sums"][0], cell["second"][0], rank=d)
    assert st is not None
    assert torch.allclose(st.mean, x.mean(0), atol=1e-5)
    cov = torch.cov(x.T, correction=0)
    assert torch.allclose(st.factor @ st.factor.T, cov, atol=1e-5)
    dreams = draw_dreams(st, 20000, torch.Generator().manual_seed(2))
    assert torch.allclose(dreams.mean(0), x.mean(0), atol=0.01)
    assert torch.allclose(torch.cov(dreams.T), cov, atol=0.003)
    assert class_statistics("", 0, 0.4, cell["sums"][0], cell["second"][0], rank=2) is None  # noised count < 1


def test_a_release_is_noised_with_the_calibrated_sigma_and_floors_the_noise_eigenvalues() -> None:
    d, n = 8, 50
    acc = StatsAccumulator(2, (d,), 1.0)
    acc.add(torch.zeros(n, d), torch.zeros(n, dtype=torch.int64))  # class 0: n zero rows; class 1: none
    noise = stats_noise(1.0, 1e-5, 1.0, d)
    with pytest.warns(DeterministicNoiseWarning):
        out = release_statistics(acc, noise, rank=d, generator=torch.Generator().manual_seed(0))
    # class 1 (count 0) is dropped unless its noise pushed the count past 1
    zero = next(s for s in out if s.label == 0)
    assert abs(zero.count - n) < 6 * noise.counts
    assert float(zero.mean.norm()) < 6 * noise.sums * math.sqrt(d) / n * 1.5
    assert float(zero.mean.norm()) > 0  # noised
    # the data have no spread: what the noise makes of the covariance is below the floor
    assert float(zero.factor.norm()) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ConfigError, match="rank"):
        release_statistics(acc, noise, rank=d + 1)


def test_stats_configs_that_cannot_be_met_are_refused() -> None:
    with pytest.raises(ConfigError, match="epsilon for the nightly release"):
        PrivacyConfig(design="stats")
    with pytest.raises(ConfigError, match="already cover"):
        PrivacyConfig(design="stats", epsilon=8.0, label_epsilon=1.0)
    with pytest.raises(ConfigError, match="design='dreams'"):
        PrivacyConfig(design="dreams", epsilon=8.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank=0"):
        PrivacyConfig(design="stats", epsilon=8.0, rank=0)


def _runtime(store: str | Path = ":memory:", **privacy: object) -> EdgeSleep:
    cfg = PrivacyConfig(design="stats", epsilon=8.0, max_norm=3.0, noise_seed=0, rank=4, **privacy)  # type: ignore[arg-type]
    return EdgeSleep(small_mlp(), store=store, store_config=StoreConfig(capacity_records=64),
                     sleep=SleepConfig(min_steps=5), privacy=cfg, seed=0)


def _day(es: EdgeSleep, n: int = 600, stream: str = "day") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    for i in range(0, n, 60):
        stats = es.learn(x[i:i + 60], y[i:i + 60], stream=stream)
        assert stats.stored == 0 and stats.slots == ()
    return x, y


def test_a_day_stores_nothing_and_its_night_stores_dreams_from_one_release(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeterministicNoiseWarning)
        es = _runtime(tmp_path / "replay.db")
        x, _ = _day(es)
        assert len(es.store) == 0 and es.class_stats is not None and es.class_stats.examples == 600
        report = es.sleep()
    assert report.completed
    assert len(es.store) == 64 and es.store.seen == pytest.approx(600, abs=30)
    assert es.class_stats.examples == 0
    (release,) = es.store.releases()
    assert release["epsilon"] == 8.0 and release["max_norm"] == 3.0
    held = es.store.read(es.store.slots())
    assert float(torch.cdist(x, held.x.reshape(64, -1)).min()) > 1e-3  # no raw example is stored
    text = str(es.store.privacy_report())
    assert "64 are dreams" in text and "(8, 1e-05)-DP for each example" in text and "label included" in text
    assert "stored without any privacy" not in text
    es.store.close()


def test_a_day_restored_after_its_release_is_not_released_again(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeterministicNoiseWarning)
        es = _runtime(tmp_path / "replay.db")
        _day(es)
        state = es.state_dict()  # a checkpoint taken before the night
        es.sleep()
        seen = es.store.seen
        es.load_state_dict(state)  # the app restores it after the night ran
        assert es.class_stats is not None and es.class_stats.examples == 600
        es.sleep()
    assert len(es.store.releases()) == 1 and es.store.seen == seen  # the day's budget is spent once
    assert es.class_stats.examples == 0
    es.store.close()


def test_a_batch_past_the_delta_is_refused_before_anything_moves() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeterministicNoiseWarning)
        es = _runtime(delta=1e-2)
        x, y = torch.randn(120, 8), torch.randint(0, 3, (120,))
        es.learn(x[:60], y[:60])
        weights = {k: v.clone() for k, v in es.model.state_dict().items()}
        with pytest.raises(InputError, match="below 1/120"):
            es.learn(x[60:], y[60:])
    assert es.class_stats is not None and es.class_stats.examples == 60
    assert all(torch.equal(v, es.model.state_dict()[k]) for k, v in weights.items())


def test_a_dream_that_fails_its_check_is_quarantined_like_any_record(tmp_path: Path) -> None:
    import sqlite3

    from edge_sleep.store import ReplayStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeterministicNoiseWarning)
        es = _runtime(tmp_path / "replay.db")
        _day(es)
        es.sleep()
    fingerprint = es.fingerprint
    es.store.close()
    db = sqlite3.connect(tmp_path / "replay.db")
    db.execute("UPDATE records SET dp_epsilon=0.01 WHERE slot=3")  # a forged, smaller epsilon
    db.commit()
    db.close()
    with pytest.warns(RuntimeWarning, match="1 damaged record"):
        store = ReplayStore(tmp_path / "replay.db", StoreConfig(capacity_records=64), fingerprint=fingerprint)
    assert len(store) == 63 and 3 not in store.slots().tolist()
    assert store.privacy_report().dreams == 63 and store.privacy_report().stats_epsilon == 8.0
    store.close()
