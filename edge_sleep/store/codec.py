"""A record's bytes: int8 codes, fp16 logits, the checksum over every field, sealing, decoding.

Pure functions: nothing here touches the database or the store's state.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_sleep.errors import StoreKeyError
from edge_sleep.quant import dequantize_rows, quantize_rows
from edge_sleep.seal import Sealer

__all__ = ["EncodedRows", "ReplayBatch", "aad", "checksum", "checksum_v1", "decode_row", "decode_rows",
           "encode_rows", "privacy_bytes", "seal_rows"]

FP16_MAX = 65504.0  # logits are stored as fp16, saturated to its finite range


@dataclass
class ReplayBatch:
    """Records drawn from the store, decoded.

    Attributes:
        x: latents ``(n, *latent_shape)`` (float32, or int64 for integer inputs).
        y: labels ``(n,)`` int64.
        logits: stored logits ``(n, C)`` float32, or ``None`` if the store keeps none.
        slots: the records' slots ``(n,)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor | None
    slots: np.ndarray

    def to(self, device: torch.device | str) -> ReplayBatch:
        """The same records with ``x``, ``y`` and ``logits`` on ``device`` (the model's)."""
        return ReplayBatch(self.x.to(device), self.y.to(device),
                           None if self.logits is None else self.logits.to(device), self.slots)


def checksum_v1(codes: bytes, logits: bytes | None, label: int) -> int:
    """Format 1's checksum (codes, logits, label): read only to migrate old files."""
    c = zlib.crc32(codes)
    if logits is not None:
        c = zlib.crc32(logits, c)
    return zlib.crc32(label.to_bytes(8, "little", signed=True), c)


def privacy_bytes(privacy: tuple[float | None, ...]) -> bytes:
    """The five privacy parameters of a record as fixed-width bytes (``None`` as NaN)."""
    return struct.pack("<5d", *(float("nan") if v is None else float(v) for v in privacy))


def checksum(slot: int, stream: str | bytes, label: int, codes: bytes, scale: float, zero_point: int,
             logits: bytes | None, privacy: tuple[float | None, ...] | bytes) -> int:
    """CRC32 over every field of a record (slot, stream, label, codes, scale, zero point, logits,
    privacy parameters), each length-prefixed so that no two records share an encoding."""
    tag = stream.encode() if isinstance(stream, str) else b"\x00sealed" + stream
    tail = b"\xff" if logits is None else logits
    # one CRC over the concatenation (the same value as chaining one CRC per part)
    return zlib.crc32(b"".join((
        struct.pack("<qqdqq", slot, label, scale, zero_point, len(tag)), tag, struct.pack("<q", len(codes)), codes,
        struct.pack("<q", len(tail)), tail, privacy if isinstance(privacy, bytes) else privacy_bytes(privacy))))


def row_bytes(a: np.ndarray) -> list[bytes]:
    """Each row of a C-contiguous 2-D array as bytes, from one copy of the whole array."""
    raw, width = a.tobytes(), a.shape[1] * a.itemsize
    return [raw[k:k + width] for k in range(0, len(raw), width)]


def aad(slot: int, label: int, field: bytes) -> bytes:
    """What a sealed field is bound to: its record's slot and label, and which field it is."""
    return struct.pack("<qq", slot, label) + field


@dataclass
class EncodedRows:
    """Rows of a batch as the store keeps them: arrays for the in-memory mirror, bytes for SQLite."""

    codes: np.ndarray  # (n, width) int8 or int64
    scales: list[float]
    zero_points: list[int]
    logits: np.ndarray | None  # (n, C) float16
    code_bytes: list[bytes]
    logit_bytes: list[bytes | None]


def encode_rows(flat: torch.Tensor, kind: str, logits: torch.Tensor | None,
                bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> EncodedRows:
    """Encode ``flat (n, width)``: int8 per-row quantization (``kind="int8q"``; ``bounds``: the
    rows' min and max if known) or int64 kept exactly; logits as fp16 saturated to its range (a
    stored logit is never inf)."""
    if kind == "int8q":
        codes_t, scale_t, zp_t = quantize_rows(flat, bounds)
        codes = np.ascontiguousarray(codes_t.numpy())
        scales, zps = scale_t.tolist(), zp_t.tolist()
    else:
        codes = np.ascontiguousarray(flat.numpy().astype(np.int64))
        scales, zps = [1.0] * len(flat), [0] * len(flat)
    logits_np = None if logits is None else np.ascontiguousarray(
        logits.detach().cpu().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).numpy())
    logit_bytes: list[bytes | None] = [None] * len(flat) if logits_np is None else list(row_bytes(logits_np))
    return EncodedRows(codes, scales, zps, logits_np, row_bytes(codes), logit_bytes)


def seal_rows(sealer: Sealer, rows: EncodedRows, slots: list[int], labels: list[int],
              stream: str) -> tuple[list[bytes], list[bytes | None], list[bytes]]:
    """Codes, logits and stream tag of each row sealed under the store's key, each bound to its
    record's slot and label and to the field it is."""
    codes = [sealer.seal(c, aad(s, y, b"codes")) for c, s, y in zip(rows.code_bytes, slots, labels)]
    logits = [None if lb is None else sealer.seal(lb, aad(s, y, b"logits"))
              for lb, s, y in zip(rows.logit_bytes, slots, labels)]
    streams = [sealer.seal(stream.encode(), aad(s, y, b"stream")) for s, y in zip(slots, labels)]
    return codes, logits, streams


def decode_row(row: tuple[Any, ...], cap: int, code_bytes: int, num_logits: int | None,
               sealer: Sealer | None) -> tuple[str | None, bytes, bytes | None]:
    """``(problem, codes, logits)`` of a stored row: ``problem`` says why it cannot be trusted
    (types, ranges, checksum, a sealed field that does not open, blob lengths), else ``None``."""
    slot, stream, label, codes, scale, zp, logits, check = row[:8]
    privacy = tuple(row[8:13])
    if not isinstance(slot, int) or not 0 <= slot < cap:
        return f"slot {slot!r} outside 0..{cap - 1}", b"", None
    if not isinstance(label, int) or label < 0:
        return f"label {label!r} is not a class index", b"", None
    if not isinstance(stream, (bytes if sealer is not None else str)):
        return "stream has the wrong type", b"", None
    if not isinstance(codes, bytes) or (logits is not None and not isinstance(logits, bytes)):
        return "codes or logits are not blobs", b"", None
    if not isinstance(scale, float) or not np.isfinite(scale) or scale <= 0 or not isinstance(zp, int):
        return f"scale {scale!r} / zero point {zp!r} out of range", b"", None
    if any(v is not None and not isinstance(v, (int, float)) for v in privacy):
        return "privacy parameters are not numbers", b"", None
    if not isinstance(check, int) or checksum(slot, stream, label, codes, scale, zp, logits, privacy) != check:
        return "checksum mismatch", b"", None
    if sealer is not None:
        try:
            codes = sealer.open(codes, aad(slot, label, b"codes"))
            logits = None if logits is None else sealer.open(logits, aad(slot, label, b"logits"))
            sealer.open(stream if isinstance(stream, bytes) else stream.encode(), aad(slot, label, b"stream"))
        except StoreKeyError:
            return "a sealed field does not open", b"", None
    if len(codes) != code_bytes:
        return f"codes are {len(codes)} bytes, expected {code_bytes}", b"", None
    if num_logits is not None and logits is not None and len(logits) != 2 * num_logits:
        return f"logits are not {2 * num_logits} bytes", b"", None
    return None, codes, logits


def decode_rows(layout: dict[str, Any], mirror: dict[str, np.ndarray], slots: np.ndarray) -> ReplayBatch:
    """The records at ``slots`` of the in-memory mirror, dequantized, in that order."""
    shape = (len(slots), *layout["latent_shape"])
    codes = torch.from_numpy(mirror["codes"][slots])
    if layout["latent_kind"] == "int8q":
        x = dequantize_rows(codes, torch.from_numpy(mirror["scale"][slots]),
                            torch.from_numpy(mirror["zero_point"][slots])).reshape(shape)
    else:
        x = codes.reshape(shape)
    logits = torch.from_numpy(mirror["logits"][slots].astype(np.float32)) if "logits" in mirror else None
    return ReplayBatch(x=x, y=torch.from_numpy(mirror["label"][slots]), logits=logits, slots=slots)
