"""The fleet's round maths (issue 26): checking an update, FedAvg, the Fisher-weighted mean."""

from __future__ import annotations

import dataclasses
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


# ----------------------------------------------------------------- the Flower apps
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


class _Offline(RuntimeError):
    pass


def _bad_day(es, node: int, server_round: int) -> int:  # type: ignore[no-untyped-def]
    """Node 3 is broken (its update carries NaN); node 1 is offline in round 2 and rejoins in round
    3 with its state of round 1; node 2 dies in round 3 after learning, before it saves or sends."""
    if node == 1 and server_round == 2:
        raise _Offline("node 1 is offline this round")
    examples = _day(es, node, server_round)
    if node == 2 and server_round == 3:
        raise _Offline("node 2 died mid-round")
    if node == 3:
        with torch.no_grad():
            next(iter(es.base_parameters.values())).fill_(float("nan"))
    return examples


def _setup(tmp_path: Path, day, **kwargs) -> tuple:  # type: ignore[no-untyped-def]
    from edge_sleep import EdgeSleep, SleepConfig, StoreConfig, WakeConfig
    from edge_sleep.fleet.apps import ClientSetup, fleet_weights

    setup = ClientSetup(folder=tmp_path / "fleet", make_model=_fleet_model, day=day,
                        wake=WakeConfig(train="all", lr=0.1), sleep=SleepConfig(min_steps=10, fisher_steps=10),
                        store=StoreConfig(capacity_records=128), **kwargs)
    start = EdgeSleep(_fleet_model(), store=tmp_path / "init.db", wake=setup.wake)
    initial, fingerprint = fleet_weights(start), start.fingerprint
    start.store.close()
    return setup, initial, fingerprint


def _accuracy(weights: dict[str, torch.Tensor]) -> float:
    x_test, y_test = _data(99, 512, shift=0.75)
    model = _fleet_model()
    model.load_state_dict(weights)
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


def _simulate(tmp_path, monkeypatch, day) -> tuple[dict[int, float], object]:  # type: ignore[no-untyped-def]
    import os

    from flwr.app import ArrayRecord, MetricRecord
    from flwr.simulation import run_simulation

    from edge_sleep.fleet.apps import client_app, fleet_strategy, server_app

    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))  # Ray's workers import tests.*
    setup, initial, fingerprint = _setup(tmp_path, day)
    accuracy: dict[int, float] = {}
    strategy = fleet_strategy(fingerprint=fingerprint, fraction_train=1.0, fraction_evaluate=0.0,
                              min_available_nodes=4, min_train_nodes=4)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy[server_round] = _accuracy(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy[server_round]})

    run_simulation(server_app=server_app(strategy, initial, rounds=3, evaluate=evaluate), client_app=client_app(setup), num_supernodes=4,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    return accuracy, strategy


@pytest.fixture(scope="module")
def clean_fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], object, Path]:
    path = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        accuracy, strategy = _simulate(path, mp, _day)
    return accuracy, strategy, path


def test_a_fleet_of_four_learns_together_for_three_rounds(clean_fleet) -> None:  # type: ignore[no-untyped-def]
    accuracy, strategy, path = clean_fleet
    assert strategy.refused == [] and sorted(accuracy) == [0, 1, 2, 3]  # round 0: the initial model
    assert [len(strategy.merged[r]) for r in (1, 2, 3)] == [4, 4, 4]
    assert accuracy[3] > accuracy[0] + 0.2  # the fleet's model learned the shared task
    for node in range(4):  # each node kept its own store and saved its runtime between rounds
        assert (path / "fleet" / f"node-{node}" / "ckpt" / "state.pt").exists()
        assert (path / "fleet" / f"node-{node}" / "replay.db").exists()


def test_a_broken_node_a_dropout_and_a_stale_node_leave_the_fleet_learning(
        clean_fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    accuracy, strategy = _simulate(tmp_path, monkeypatch, _bad_day)
    assert [r for r, _, _ in strategy.refused] == [1, 2, 3]  # node 3's update, every round, with the reason
    assert all("non-finite" in "; ".join(reasons) for _, _, reasons in strategy.refused)
    # round 1: nodes 0, 1, 2; round 2: node 1 offline; round 3: node 1 back (its state of round 1), node 2 died
    assert [len(strategy.merged[r]) for r in (1, 2, 3)] == [3, 2, 2]
    assert strategy.merged[3] != strategy.merged[2]  # the node back in round 3 is not one of round 2's
    assert all(math.isfinite(a) for a in accuracy.values()) and accuracy[3] > accuracy[0] + 0.2
    assert accuracy[3] >= clean_fleet[0][3] - 0.1  # one bad node does not make the fleet's model worse


# ----------------------------------------------------------------- rounds in-process
class _Grid:
    """What a strategy asks of Flower's Grid when it samples nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's messages carry the run's identity, which its runtime sets; these tests are the runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _round(strategy, app, weights: dict[str, torch.Tensor], server_round: int, nodes: int = 4,  # type: ignore[no-untyped-def]
           tamper=None) -> dict[str, torch.Tensor] | None:
    """One round of ``strategy`` with ``app`` on ``nodes`` nodes (node ids 10, 11...), run here."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    messages = list(strategy.configure_train(server_round, ArrayRecord(weights), ConfigRecord(),
                                             _Grid([10 + k for k in range(nodes)])))
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id - 10
        reply = app(msg, Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={"partition-id": node},
                                 state=RecordDict(), run_config={}))
        reply = tamper(node, reply) if tamper else reply
        if reply is not None:  # None: the node never answered
            replies.append(reply)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else arrays.to_torch_state_dict()


def test_nodes_that_speak_another_model_version_or_round_are_refused_with_the_reason(
        tmp_path: Path, task_identity: None) -> None:
    from flwr.app import ArrayRecord

    from edge_sleep.fleet.apps import client_app, fleet_strategy

    setup, initial, fingerprint = _setup(tmp_path, _day, nights=False)
    strategy = fleet_strategy(fingerprint=fingerprint, payload="delta", min_available_nodes=4)

    def tamper(node: int, reply):  # type: ignore[no-untyped-def]
        meta = reply.content.config_records["fleet"]
        if node == 0:
            meta["fingerprint"] = "another-model"
        elif node == 1:
            meta["format-version"] = 99
        elif node == 2:
            meta["server-round"] = 0  # a late reply to an earlier round: its change is against old weights
        else:
            arrays = reply.content.array_records["arrays"].to_torch_state_dict()
            arrays["0.weight"] = torch.zeros(3, 3)
            reply.content.array_records["arrays"] = ArrayRecord(arrays)
        return reply

    assert _round(strategy, client_app(setup), initial, 1, tamper=tamper) is None  # nothing left to merge
    reasons = {node - 10: r[0] for _, node, r in strategy.refused}
    assert "fingerprint 'another-model'" in reasons[0] and "format-version 99" in reasons[1]
    assert "server-round 0, expected 1" in reasons[2] and "0.weight: shape (3, 3); expected (16, 8)" in reasons[3]


def test_a_round_in_process_merges_what_the_nodes_learned(tmp_path: Path, task_identity: None) -> None:
    from edge_sleep.fleet.apps import client_app, fleet_strategy

    setup, initial, fingerprint = _setup(tmp_path, _day)
    for payload, int8 in (("weights", False), ("adapters", True)):
        strategy = fleet_strategy(fingerprint=fingerprint, payload=payload, int8=int8, rank=2, min_available_nodes=4)
        setup = dataclasses.replace(setup, folder=tmp_path / payload)
        weights = initial
        for r in (1, 2, 3):
            merged = _round(strategy, client_app(setup), weights, r)
            assert merged is not None
            weights = merged
        assert strategy.refused == [] and _accuracy(weights) > _accuracy(initial) + 0.2, payload
        if payload == "adapters":  # rank-2 int8 factors of 16x8 weights: under a fifth of the full weights
            full = 4 * sum(t.numel() for t in initial.values())
            assert max(strategy.bytes_sent[3]) < full / 2


def test_under_privacy_nodes_clip_the_server_adds_noise_and_the_budget_is_counted(
        tmp_path: Path, task_identity: None) -> None:
    from edge_sleep.fleet.apps import client_app, fleet_strategy, privacy_spent
    from edge_sleep.fleet.privacy import FleetPrivacy, spent

    setup, initial, fingerprint = _setup(tmp_path, _day)
    privacy = FleetPrivacy(epsilon=8.0, delta=1e-3, rounds=2, clip=0.5)
    strategy = fleet_strategy(fingerprint=fingerprint, payload="delta", privacy=privacy, num_nodes=4,
                              min_available_nodes=4)
    merged = _round(strategy, client_app(setup), initial, 1)
    assert merged is not None
    z = privacy.noise_multiplier
    # the mean of 4 changes each clipped to 0.5 moves at most 0.5; the rest is noise of std z * 0.5 / 4
    noise = torch.cat([(merged[n] - initial[n]).flatten() for n in initial])
    assert float(noise.std()) == pytest.approx(z * 0.5 / 4, rel=0.15)
    assert privacy_spent(strategy, 1e-3) == pytest.approx(spent([z], 1e-3))
    _round(strategy, client_app(setup), merged, 2)
    assert privacy_spent(strategy, 1e-3) == pytest.approx(8.0, rel=1e-3)  # the whole budget, after its rounds
    with pytest.raises(ValueError, match="num_nodes=None with privacy"):
        fleet_strategy(fingerprint=fingerprint, privacy=privacy)
    with pytest.raises(ValueError, match="merge='fisher' weighs each node"):
        fleet_strategy(fingerprint=fingerprint, privacy=privacy, num_nodes=4, merge="fisher")


def test_the_fisher_weighted_merge_gets_each_nodes_fisher(tmp_path: Path, task_identity: None) -> None:
    from edge_sleep.fleet.apps import client_app, fleet_strategy

    setup, initial, fingerprint = _setup(tmp_path, _day)
    strategy = fleet_strategy(fingerprint=fingerprint, merge="fisher", min_available_nodes=4)
    first = _round(strategy, client_app(setup), initial, 1)
    plain = fleet_strategy(fingerprint=fingerprint, min_available_nodes=4)
    assert first is not None and strategy.refused == []
    # the nodes' Fisher went with their weights (more bytes than the weights alone) and moved the merge
    assert min(strategy.bytes_sent[1]) > 4 * sum(t.numel() for t in initial.values())
    other = _round(plain, client_app(dataclasses.replace(setup, folder=tmp_path / "plain")), initial, 1)
    assert other is not None
    assert any(not torch.allclose(first[n], other[n]) for n in initial)
    assert _accuracy(first) > _accuracy(initial)


def test_a_node_that_never_answers_is_logged_and_the_round_goes_on(tmp_path: Path, task_identity: None,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from edge_sleep.fleet.apps import client_app, fleet_of, fleet_strategy

    setup, initial, fingerprint = _setup(tmp_path, _day, nights=False)
    strategy = fleet_strategy(fingerprint=fingerprint, min_available_nodes=4)
    with caplog.at_level("WARNING", logger="edge_sleep.fleet.apps"):
        merged = _round(strategy, client_app(setup), initial, 1, tamper=lambda node, reply: None if node == 2 else reply)
    assert merged is not None and fleet_of(strategy).silent == [(1, 12)]
    assert len(fleet_of(strategy).merged[1]) == 3
    assert "round 1: node 12 did not answer in time" in caplog.text


def test_the_server_app_refuses_a_bad_round_count_or_timeout(tmp_path: Path) -> None:
    from edge_sleep.fleet.apps import fleet_strategy, server_app

    _, initial, fingerprint = _setup(tmp_path, _day)
    strategy = fleet_strategy(fingerprint=fingerprint)
    with pytest.raises(ValueError, match="rounds=0"):
        server_app(strategy, initial, rounds=0)
    with pytest.raises(ValueError, match="timeout=-1"):
        server_app(strategy, initial, rounds=1, timeout=-1)
