"""What a node sends (issue 26): payloads, int8, clipping; and the fleet's privacy budget."""

from __future__ import annotations

import pytest
import torch

from edge_sleep.fleet.payload import decode, encode, payload_bytes, update_norm
from edge_sleep.fleet.privacy import FleetPrivacy, spent


def _fleet() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"0.weight": torch.randn(64, 32, generator=g), "0.bias": torch.randn(64, generator=g),
            "conv.weight": torch.randn(16, 3, 3, 3, generator=g), "head.weight": torch.randn(4, 64, generator=g)}


def _mine(fleet: dict[str, torch.Tensor], rank: int = 4, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """The fleet's weights moved by a change of rank ``rank`` in each matrix (a day of adapters)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for n, w in fleet.items():
        if w.ndim >= 2:
            rows, cols = w.shape[0], w[0].numel()
            low = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
            out[n] = w + scale * low.reshape(w.shape)
        else:
            out[n] = w + scale * torch.randn(w.shape, generator=g)
    return out


@pytest.mark.parametrize("payload", ["weights", "delta", "adapters"])
def test_each_payload_decodes_to_the_nodes_weights(payload: str) -> None:
    fleet = _fleet()
    mine = _mine(fleet, rank=4)
    sent, norm = encode(mine, fleet, payload=payload, rank=4)
    assert norm == pytest.approx(update_norm({n: mine[n] - fleet[n] for n in fleet}), rel=1e-6)
    back = decode(sent, fleet, payload=payload, rank=4)
    for n in fleet:
        torch.testing.assert_close(back[n], mine[n], atol=1e-4, rtol=1e-4)


def test_adapters_are_a_fraction_of_the_full_weights_and_int8_a_quarter_again() -> None:
    fleet = _fleet()
    mine = _mine(fleet, rank=4)
    full = payload_bytes(encode(mine, fleet, payload="weights")[0])
    assert full == 4 * sum(t.numel() for t in fleet.values())
    low = payload_bytes(encode(mine, fleet, payload="adapters", rank=4)[0])
    assert low < full / 3  # 64x32 at rank 4: 384 numbers instead of 2048; the small head is sent whole
    low8 = payload_bytes(encode(mine, fleet, payload="adapters", rank=4, int8=True)[0])
    assert low8 < low / 2
    # the head (4 x 64) is not factored at rank 4: it has rank 4 already, and goes in full
    assert "head.weight" in encode(mine, fleet, payload="adapters", rank=4)[0]


def test_a_change_of_higher_rank_is_sent_as_its_best_low_rank_part() -> None:
    fleet = _fleet()
    mine = _mine(fleet, rank=12)
    back = decode(encode(mine, fleet, payload="adapters", rank=4)[0], fleet, payload="adapters", rank=4)
    change, kept = mine["0.weight"] - fleet["0.weight"], back["0.weight"] - fleet["0.weight"]
    s = torch.linalg.svdvals(change)
    # Eckart-Young: the residual is exactly the energy past the 4th singular value
    assert float((change - kept).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-4)


def test_int8_rounds_each_value_by_at_most_half_a_step() -> None:
    fleet = _fleet()
    mine = _mine(fleet)
    for payload in ("delta", "adapters"):
        sent, _ = encode(mine, fleet, payload=payload, int8=True)
        assert all(t.dtype in (torch.int8, torch.float32, torch.int32) for t in sent.values())
        back = decode(sent, fleet, payload=payload, int8=True)
        for n in fleet:
            change = (mine[n] - fleet[n]).reshape(fleet[n].shape[0] if fleet[n].ndim > 1 else 1, -1)
            step = (change.amax(1).clamp(min=0) - change.amin(1).clamp(max=0)) / 255
            err = (back[n] - mine[n]).reshape(change.shape).abs()
            if payload == "delta":
                assert bool((err <= step[:, None] / 2 + 1e-6).all()), n
            else:
                assert float(err.max()) < 0.05 * float(change.abs().max()), n


def test_clipping_bounds_the_change_and_reports_its_norm_before() -> None:
    fleet = _fleet()
    mine = _mine(fleet, scale=1.0)
    before = update_norm({n: mine[n] - fleet[n] for n in fleet})
    for payload in ("weights", "delta", "adapters"):
        sent, norm = encode(mine, fleet, payload=payload, clip=0.5)
        assert norm == pytest.approx(before, rel=1e-6) and before > 0.5
        back = decode(sent, fleet, payload=payload)
        assert update_norm({n: back[n] - fleet[n] for n in fleet}) <= 0.5 + 1e-4
    small, _ = encode(fleet, fleet, payload="delta", clip=0.5)  # nothing changed: nothing to clip
    assert all(float(t.abs().max()) == 0 for t in small.values())


def test_a_malformed_payload_is_refused_with_each_problem_named() -> None:
    fleet = _fleet()
    sent, _ = encode(_mine(fleet), fleet, payload="adapters", rank=4)
    bad = dict(sent)
    del bad["0.bias"]
    bad["0.weight#u"] = torch.zeros(64, 5)
    bad["extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        decode(bad, fleet, payload="adapters", rank=4)
    text = str(info.value)
    assert "0.bias: missing" in text and "0.weight: factors (64, 5)" in text and "['extra']" in text
    with pytest.raises(ValueError, match="factors in a 'delta' payload"):
        decode(sent, fleet, payload="delta", rank=4)
    with pytest.raises(ValueError, match=r"int64; expected a floating-point"):
        decode({**encode(fleet, fleet, payload="delta")[0], "0.bias": torch.zeros(64, dtype=torch.long)}, fleet,
               payload="delta")
    with pytest.raises(ValueError, match="in an int8 payload"):
        decode(sent, fleet, payload="adapters", rank=4, int8=True)
    with pytest.raises(ValueError, match="payload='lora'"):
        encode(fleet, fleet, payload="lora")
    with pytest.raises(ValueError, match="clip=0"):
        encode(fleet, fleet, clip=0)
    with pytest.raises(ValueError, match="differ in names or shapes"):
        encode({"0.bias": fleet["0.bias"]}, fleet)


def test_the_fleets_noise_spends_exactly_its_budget_over_its_rounds() -> None:
    p = FleetPrivacy(epsilon=8.0, delta=1e-5, rounds=10, clip=1.0)
    z = p.noise_multiplier
    assert spent([z] * 10, 1e-5) == pytest.approx(8.0, rel=1e-3)
    assert spent([z] * 5, 1e-5) < 8.0 < spent([z] * 11, 1e-5)  # fewer rounds spend less, more overspend
    assert spent([z * 0.5] + [z] * 9, 1e-5) > 8.0  # a round merged from half its nodes costs more
    assert spent([], 1e-5) == 0.0
    # more rounds for the same budget need more noise
    assert FleetPrivacy(epsilon=8.0, delta=1e-5, rounds=20, clip=1.0).noise_multiplier > z


@pytest.mark.parametrize(("kwargs", "match"), [({"epsilon": 0.0}, "epsilon=0.0"), ({"delta": 1.0}, "delta=1.0"),
                                               ({"rounds": 0}, "rounds=0"), ({"clip": float("inf")}, "clip=inf")])
def test_a_bad_budget_is_refused_with_the_value(kwargs: dict[str, float], match: str) -> None:
    args = {"epsilon": 8.0, "delta": 1e-5, "rounds": 10, "clip": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        FleetPrivacy(**args)  # type: ignore[arg-type]
