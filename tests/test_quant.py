from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sleep.quant import dequantize_rows, quantize_rows


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 300), scale=st.floats(1e-3, 1e3), shift=st.floats(-10, 10),
       seed=st.integers(0, 2**16))
def test_error_is_at_most_half_a_step(n: int, d: int, scale: float, shift: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * scale + shift
    codes, s, zp = quantize_rows(x)
    assert codes.dtype == torch.int8 and s.shape == (n,) and zp.shape == (n,)
    err = (dequantize_rows(codes, s, zp) - x).abs().amax(dim=1)
    assert torch.all(err <= s / 2 * (1 + 1e-4) + 1e-6 * x.abs().amax(dim=1))


def test_constant_and_zero_rows_are_exact() -> None:
    x = torch.stack([torch.zeros(5), torch.full((5,), 3.0)])
    codes, s, zp = quantize_rows(x)
    assert torch.allclose(dequantize_rows(codes, s, zp), x, atol=3.0 / 255)
    assert dequantize_rows(codes, s, zp)[0].abs().max() == 0
