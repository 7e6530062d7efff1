"""The fleet's round maths (issue 26): checking an update, FedAvg, the Fisher-weighted mean."""

from __future__ import annotations

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
