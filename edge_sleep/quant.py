"""Per-row affine int8 quantization (pure functions).

A row ``x`` (one record's latent, flattened) is stored as ``codes = round(x / scale) + zero_point``
clamped to ``[-128, 127]`` with ``scale = (max - min) / 255``. Dequantization error per element is
at most ``scale / 2``.

Example:
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.5, 1.0]])
    >>> codes, scale, zp = quantize_rows(x)
    >>> bool((dequantize_rows(codes, scale, zp) - x).abs().max() <= scale.max() / 2 + 1e-7)
    True
"""

from __future__ import annotations

import torch

__all__ = ["quantize_rows", "dequantize_rows", "row_bounds"]


def row_bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``(min, max)`` of a float ``(N, D)`` tensor. Both propagate NaN and the max
    +inf, the min -inf, so the rows are all finite exactly when both results are."""
    x = x.detach().to(torch.float32)
    return x.amin(dim=1), x.amax(dim=1)


def quantize_rows(x: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to int8 with its own scale and zero point.

    Args:
        x: float tensor ``(N, D)``; must be finite.
        bounds: :func:`row_bounds` of ``x`` when the caller has them already (one pass fewer).

    Returns:
        ``codes`` int8 ``(N, D)``, ``scale`` float32 ``(N,)``, ``zero_point`` int32 ``(N,)``.
    """
    x = x.detach().to(torch.float32)
    row_min, row_max = bounds if bounds is not None else row_bounds(x)
    lo = row_min.clamp(max=0.0)  # (N,) include 0 so zero is exact
    hi = row_max.clamp(min=0.0)  # (N,)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = (-128 - torch.round(lo / scale)).to(torch.int32)  # lo maps to -128
    codes = torch.round(x / scale[:, None]) + zero_point[:, None]
    codes = codes.clamp(-128, 127).to(torch.int8)
    return codes, scale, zero_point


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: ``(codes - zero_point) * scale`` as float32 ``(N, D)``."""
    return (codes.to(torch.float32) - zero_point.to(torch.float32)[:, None]) * scale.to(torch.float32)[:, None]
