"""The fleet's round maths (issue 26): checking an update, FedAvg, the Fisher-weighted mean."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edge_sleep.fleet import check_update, fisher_weighted_mean, weighted_mean


def _model() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(3, 2), "b": torch.zeros(4)}


def test_a_well_formed_update_has_no_problems_and_each_malformed_one_is_named() -> None:
    assert check_update({"a": torch.randn(3, 2), "b": torch.randn(4)}, _model()) == []
    bad = {"a": torch.randn(2, 3), "c": torch.randn(1)}
    assert check_update(bad, _model()) == ["missing tensors ['b']", "tensors the fleet's model does not have ['c']",
                                           "a: shape (2, 3); expected (3, 2)"]
    nan = {"a": torch.full((3, 2), float("nan")), "b": torch.tensor([1.0, float("inf"), 0.0, 0.0])}
    assert check_update(nan, _model()) == ["a: 6 non-finite values", "b: 1 non-finite values"]
    ints = {"a": torch.zeros(3, 2, dtype=torch.long), "b": [0.0] * 4}
    assert check_update(ints, _model()) == ["a: torch.int64; expected a floating-point tensor",  # type: ignore[dict-item]
                                            "b: list; expected a floating-point tensor"]


def test_fedavg_weighs_each_client_by_its_examples() -> None:
    g = torch.Generator().manual_seed(0)
    ups = [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    out = weighted_mean(ups, [10, 30, 60])
    for n in ("a", "b"):
        torch.testing.assert_close(out[n], 0.1 * ups[0][n] + 0.3 * ups[1][n] + 0.6 * ups[2][n])
        assert out[n].dtype == torch.float32
    # one client: its own update; a client with no examples counts for nothing
    torch.testing.assert_close(weighted_mean(ups[:1], [5])["a"], ups[0]["a"])
    torch.testing.assert_close(weighted_mean(ups[:2], [0, 7])["b"], ups[1]["b"])


@pytest.mark.parametrize(("weights", "match"), [([1, 2], "2 weights for 3 updates"), ([1, -1, 1], r"weights \[-1\]"),
                                                ([0, 0, 0], "sum to 0"), ([1, float("nan"), 1], "finite numbers")])
def test_bad_weights_are_refused_with_the_value(weights: list[float], match: str) -> None:
    ups = [_model() for _ in range(3)]
    with pytest.raises(ValueError, match=match):
        weighted_mean(ups, weights)


def test_updates_must_name_the_same_tensors() -> None:
    with pytest.raises(ValueError, match="update 1 names"):
        weighted_mean([_model(), {"a": torch.zeros(3, 2)}], [1, 1])
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], [])


def test_the_fisher_weighted_mean_keeps_each_weight_where_the_data_that_needs_it_put_it() -> None:
    a = {"w": torch.tensor([1.0, 1.0, 1.0])}
    b = {"w": torch.tensor([5.0, 5.0, 5.0])}
    fa = {"w": torch.tensor([1e6, 1.0, 0.0])}  # client a depends on weight 0; nobody on weight 2
    fb = {"w": torch.tensor([0.0, 1.0, 0.0])}
    out = fisher_weighted_mean([a, b], [fa, fb], [1, 1])["w"]
    assert out[0].item() == pytest.approx(1.0)  # a's value: only a's data cares
    assert out[1].item() == pytest.approx(3.0)  # equal Fisher: the plain mean
    assert out[2].item() == pytest.approx(3.0)  # no Fisher anywhere: FedAvg
    # the examples weight the Fisher too: 3 times b's examples moves weight 1 toward b
    assert fisher_weighted_mean([a, b], [fa, fb], [1, 3])["w"][1].item() == pytest.approx(4.0)
    # equal Fishers everywhere reduce to FedAvg
    same = {"w": torch.full((3,), 2.0)}
    torch.testing.assert_close(fisher_weighted_mean([a, b], [same, same], [1, 3])["w"], weighted_mean([a, b], [1, 3])["w"])


def test_a_fisher_that_is_negative_or_misshapen_is_refused() -> None:
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="Fisher 1:.*negative values"):
        fisher_weighted_mean([a, b], [{"w": torch.ones(3)}, {"w": -torch.ones(3)}], [1, 1])
    with pytest.raises(ValueError, match=r"Fisher 0:.*shape \(2,\)"):
        fisher_weighted_mean([a, b], [{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1, 1])
    with pytest.raises(ValueError, match="1 Fishers for 2 updates"):
        fisher_weighted_mean([a, b], [{"w": torch.ones(3)}], [1, 1])


# ----------------------------------------------------------------- the Flower apps, simulated
def _fleet_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


_RULE = torch.Generator().manual_seed(123)
_W = torch.randn(8, 3, generator=_RULE)  # one task the whole fleet shares; each node sees its own slice


def _data(seed: int, n: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) + shift
    return x, (x @ _W).argmax(dim=1)


def _day(es, node: int, server_round: int) -> int:  # type: ignore[no-untyped-def]
    x, y = _data(1000 * node + server_round, 96, shift=0.5 * node)  # non-identical: each node's inputs shifted
    for i in range(0, 96, 32):
        es.learn(x[i:i + 32], y[i:i + 32], stream=f"node{node}")
    return 96


def _bad_day(es, node: int, server_round: int) -> int:  # type: ignore[no-untyped-def]
    examples = _day(es, node, server_round)
    if node == 3:  # a broken phone: its update will carry NaN
        with torch.no_grad():
            next(iter(es.base_parameters.values())).fill_(float("nan"))
    return examples


def _simulate(tmp_path, monkeypatch, day) -> tuple[dict[int, float], list]:  # type: ignore[no-untyped-def]
    import os

    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
    from edge_sleep.fleet.apps import CheckedFedAvg, ClientSetup, client_app, fleet_weights

    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))  # Ray's workers import tests.*
    setup = ClientSetup(folder=tmp_path / "fleet", make_model=_fleet_model, day=day,
                        wake=WakeConfig(train="all", lr=0.1), sleep=SleepConfig(min_steps=10, fisher_steps=10),
                        store=StoreConfig(capacity_records=128))
    start = EdgeSleep(_fleet_model(), store=tmp_path / "init.db", wake=setup.wake)
    initial = ArrayRecord(fleet_weights(start))
    start.store.close()
    x_test, y_test = _data(99, 512, shift=0.75)
    accuracy: dict[int, float] = {}
    strategy = CheckedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=4, min_train_nodes=4)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = _fleet_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy[server_round] = float((model(x_test).argmax(1) == y_test).float().mean())
        return MetricRecord({"accuracy": accuracy[server_round]})

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=3, evaluate_fn=evaluate)

    run_simulation(server_app=server, client_app=client_app(setup), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    return accuracy, strategy.refused


def test_a_fleet_of_four_learns_together_for_three_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accuracy, refused = _simulate(tmp_path, monkeypatch, _day)
    assert refused == [] and sorted(accuracy) == [0, 1, 2, 3]  # round 0: the initial model
    assert accuracy[3] > accuracy[0] + 0.2  # the fleet's model learned the shared task
    for node in range(4):  # each node kept its own store and saved its runtime between rounds
        assert (tmp_path / "fleet" / f"node-{node}" / "ckpt" / "state.pt").exists()
        assert (tmp_path / "fleet" / f"node-{node}" / "replay.db").exists()


def test_a_client_that_sends_nan_is_refused_and_the_round_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accuracy, refused = _simulate(tmp_path, monkeypatch, _bad_day)
    assert [r for r, _, _ in refused] == [1, 2, 3]  # node 3's update, every round
    assert all("non-finite" in "; ".join(reasons) for _, _, reasons in refused)
    assert all(math.isfinite(a) for a in accuracy.values()) and accuracy[3] > accuracy[0] + 0.2
