"""What a node sends in a round, and how the server reads it back (pure functions).

A round's update is the change the node made to the fleet's weights it was sent
(``delta = mine - fleet``). Three payloads carry it:

- ``"weights"``: the node's weights in full (``fleet + delta``), what plain FedAvg sends.
- ``"delta"``: the change itself; the same bytes, but what clipping and int8 work on.
- ``"adapters"``: the change as the adapters' size. Each 2-D (or convolution) weight whose change
  has rank above ``rank`` is sent as its best rank-``rank`` factors (``u @ v``, from its SVD; the
  day's adapters have exactly that rank, so a day learned through adapters is sent whole and a
  night's change to the same layers is projected on it); every other tensor's change in full
  (biases, norms, small heads).

``clip`` bounds the change's L2 norm over all tensors before it is sent (differential privacy's
client-side clipping; a factored change is never larger than the change it comes from).
``int8`` then quantizes every sent tensor per row (:func:`edge_sleep.quant.quantize_rows`: codes
plus a float scale and an int zero point per row), a quarter of the bytes.

:func:`encode` runs on the node, :func:`decode` on the server; :func:`decode` checks the payload
against the fleet's tensors and says what is wrong with a malformed one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from edge_sleep.quant import dequantize_rows, quantize_rows

__all__ = ["PAYLOADS", "clip_", "decode", "encode", "payload_bytes", "update_norm"]

PAYLOADS = ("weights", "delta", "adapters")
_U, _V, _Q, _S, _Z = "#u", "#v", "#q", "#scale", "#zero"


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a change over all its tensors."""
    return math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))


def clip_(delta: dict[str, torch.Tensor], clip: float) -> float:
    """Scale ``delta`` in place so its L2 norm is at most ``clip``; return the norm before."""
    norm = update_norm(delta)
    if norm > clip:
        for n in delta:
            delta[n] = delta[n] * (clip / norm)
    return norm


def _check(payload: str, rank: int, clip: float | None) -> None:
    if payload not in PAYLOADS:
        raise ValueError(f"payload={payload!r}; expected one of {list(PAYLOADS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}; expected an int >= 1 (the adapters' rank)")
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip={clip!r}; expected a finite norm > 0, or None for no clipping")


def _factorable(t: torch.Tensor, rank: int) -> bool:
    return t.ndim >= 2 and rank < min(t.shape[0], t[0].numel())


def encode(mine: Mapping[str, torch.Tensor], fleet: Mapping[str, torch.Tensor], *, payload: str = "weights",
           rank: int = 8, int8: bool = False, clip: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors a node sends for ``mine`` (its weights after the round) against ``fleet`` (the
    weights it was sent), and the change's L2 norm before clipping.

    Raises:
        ValueError: an unknown payload, a rank below 1, a clip that is not a positive number, or
            ``mine`` and ``fleet`` naming other tensors or shapes.
    """
    _check(payload, rank, clip)
    if sorted(mine) != sorted(fleet) or any(mine[n].shape != fleet[n].shape for n in fleet):
        raise ValueError("the node's weights and the fleet's differ in names or shapes; expected the same model")
    delta = {n: mine[n].detach().float() - fleet[n].detach().float() for n in sorted(fleet)}
    norm = clip_(delta, clip) if clip is not None else update_norm(delta)
    sent: dict[str, torch.Tensor] = {}
    for n, d in delta.items():
        if payload == "weights":
            sent[n] = fleet[n].detach().float() + d
        elif payload == "adapters" and _factorable(d, rank):
            u, s, vh = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)
            sent[n + _U], sent[n + _V] = u[:, :rank] * s[:rank], vh[:rank].contiguous()
        else:
            sent[n] = d
    if int8:
        sent = {k: v for n, t in sent.items() for k, v in _quantize(n, t).items()}
    return sent, norm


def _quantize(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    codes, scale, zero = quantize_rows(t.reshape(t.shape[0] if t.ndim >= 2 else 1, -1))
    return {name + _Q: codes, name + _S: scale, name + _Z: zero}


def decode(sent: Mapping[str, torch.Tensor], fleet: Mapping[str, torch.Tensor], *, payload: str = "weights",
           rank: int = 8, int8: bool = False) -> dict[str, torch.Tensor]:
    """The node's weights (``fleet + change``) from what it sent; the inverse of :func:`encode`
    up to the SVD's truncation and int8's rounding.

    Raises:
        ValueError: the payload does not fit the fleet's tensors, with each problem named
            (missing or extra tensors, a wrong shape or dtype, a factor of another rank).
    """
    _check(payload, rank, None)
    problems: list[str] = []
    tensors = dict(sent)
    if any(not isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"the payload holds {sorted({type(t).__name__ for t in tensors.values()})}; expected tensors")
    if int8:
        tensors = {}
        stems = sorted({k[: -len(sfx)] for k in sent for sfx in (_Q, _S, _Z) if k.endswith(sfx)})
        stray = sorted(k for k in sent if not k.endswith((_Q, _S, _Z)))
        if stray:
            problems.append(f"tensors {stray} in an int8 payload; expected each as {_Q}, {_S} and {_Z}")
        for stem in stems:
            parts = [sent.get(stem + sfx) for sfx in (_Q, _S, _Z)]
            if any(p is None for p in parts):
                problems.append(f"{stem}: expected {_Q}, {_S} and {_Z}")
                continue
            codes, scale, zero = parts
            assert codes is not None and scale is not None and zero is not None
            if codes.dtype != torch.int8 or codes.ndim != 2 or scale.shape != (codes.shape[0],) \
                    or zero.shape != (codes.shape[0],) or not scale.is_floating_point():
                problems.append(f"{stem}: int8 codes {tuple(codes.shape)} {codes.dtype} with scales "
                                f"{tuple(scale.shape)}; expected 2-D int8 codes and one scale and zero point a row")
                continue
            tensors[stem] = dequantize_rows(codes, scale, zero)
    out: dict[str, torch.Tensor] = {}
    for n in sorted(fleet):
        base = fleet[n].detach().float()
        if n + _U in tensors or n + _V in tensors:
            u, v = tensors.get(n + _U), tensors.get(n + _V)
            if payload != "adapters" or u is None or v is None:
                problems.append(f"{n}: factors in a {payload!r} payload, or one factor without the other")
                continue
            if not (u.is_floating_point() and v.is_floating_point()):
                problems.append(f"{n}: factors of {u.dtype} and {v.dtype}; expected floating point")
                continue
            want_u, want_v = (base.shape[0], rank), (rank, base[0].numel())
            if tuple(u.shape) != want_u or tuple(v.shape) != want_v:
                problems.append(f"{n}: factors {tuple(u.shape)} and {tuple(v.shape)}; expected {want_u} and {want_v}")
                continue
            out[n] = base + (u.float() @ v.float()).reshape(base.shape)
        elif n in tensors:
            t = tensors[n]
            if not t.is_floating_point():
                problems.append(f"{n}: {t.dtype}; expected a floating-point tensor")
                continue
            if t.numel() != base.numel() or (not int8 and tuple(t.shape) != tuple(base.shape)):
                problems.append(f"{n}: shape {tuple(t.shape)}; expected {tuple(base.shape)}")
                continue
            t = t.reshape(base.shape).float()
            out[n] = t if payload == "weights" else base + t
        else:
            problems.append(f"{n}: missing")
    known = {n + sfx for n in fleet for sfx in ("", _U, _V)}
    extra = sorted(set(tensors) - known)
    if extra:
        problems.append(f"tensors the fleet's model does not have {extra}")
    if problems:
        raise ValueError("; ".join(problems))
    return out


def payload_bytes(sent: Mapping[str, torch.Tensor]) -> int:
    """The bytes of the tensors sent (their data, as a phone's radio would carry them)."""
    return sum(t.numel() * t.element_size() for t in sent.values())
