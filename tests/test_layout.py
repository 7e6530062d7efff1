"""Where learned tensors lie in a .ptd: probes found by their bytes, real values written in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_sleep.export.layout import Layout, locate, module_tensors, patch, probe_copy, tensor_bytes


def _blob(tensors: list[torch.Tensor], pad: int = 16) -> bytes:
    """A stand-in for a .ptd: a header, then each tensor's bytes after some padding."""
    out = b"FH01" + b"\0" * 60
    for t in tensors:
        out += b"\0" * pad + tensor_bytes(t)
    return out


def test_probes_are_found_and_real_values_written_at_their_offsets() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model.register_buffer("ids", torch.arange(5))  # an integer buffer keeps its values, unprobed
    probe, real, complete = probe_copy(model, exclude=frozenset({"2.bias"}))
    assert complete and set(real) == {"0.weight", "0.bias", "2.weight"}
    probes = module_tensors(probe)
    assert torch.equal(probes["ids"], model.ids) and torch.equal(probes["2.bias"], model[2].bias)
    assert all(not torch.equal(probes[n], real[n]) for n in real)
    # the exporter wrote 0.weight twice (two methods read it) and the rest once, in another order
    data = _blob([probes["2.weight"], probes["0.weight"], probes["2.bias"], probes["0.bias"], probes["0.weight"]])
    layout = locate(data, {n: probes[n] for n in real})
    assert layout is not None and len(layout.tensors["0.weight"][2]) == 2
    assert Layout.from_json(layout.to_json()) == layout
    written = patch(data, layout, real)
    assert written == _blob([real["2.weight"], real["0.weight"], probes["2.bias"], real["0.bias"], real["0.weight"]])


def test_a_transformed_tensor_gives_no_layout_and_bad_values_are_refused() -> None:
    probe, real, _ = probe_copy(nn.Linear(4, 3))
    probes = module_tensors(probe)
    transposed = _blob([probes["weight"].t().contiguous(), probes["bias"]])
    assert locate(transposed, {n: probes[n] for n in real}) is None
    data = _blob([probes["weight"], probes["bias"]])
    layout = locate(data, {n: probes[n] for n in real})
    assert layout is not None
    with pytest.raises(ValueError, match="no value for 'bias'"):
        patch(data, layout, {"weight": real["weight"]})
    with pytest.raises(ValueError, match=r"'weight' is \(4, 3\)"):
        patch(data, layout, {"weight": real["weight"].t(), "bias": real["bias"]})
    with pytest.raises(ValueError, match="float64"):
        patch(data, layout, {"weight": real["weight"].double(), "bias": real["bias"]})


def test_convolution_weights_are_not_probed_and_the_layout_is_incomplete() -> None:
    _, real, complete = probe_copy(nn.Conv2d(1, 2, 3))
    assert not complete and set(real) == {"bias"}
