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

__all__ = ["SEALED_SCALE", "SEALED_ZERO_POINT", "EncodedRows", "ReplayBatch", "aad", "checksum", "checksum_v1",
           "decode_row", "decode_rows", "encode_rows", "pad_stream", "privacy_bytes", "record_aad", "seal_rows",
           "unpad_stream"]

FP16_MAX = 65504.0  # logits are stored as fp16, saturated to its finite range
# the clear scale and zero point of a sealed record (its real ones are sealed with its codes)
SEALED_SCALE, SEALED_ZERO_POINT = 1.0, 0
STREAM_PAD = 64  # a sealed stream tag's length is a multiple of this, so it does not tell the tag's length
_SCALE_ZP = struct.Struct("<dq")  # the scale and zero point sealed in front of the codes


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
    """What a sealed field of the first sealed format was bound to: its record's slot and label,
    and which field it is (read only to migrate such stores to :func:`record_aad`)."""
    return struct.pack("<qq", slot, label) + field


def record_aad(store_id: bytes, slot: int, label: int, privacy: bytes, field: bytes) -> bytes:
    """What a sealed field is bound to: the store (its random id, so a record copied from
    another store under the same key does not open), the record's clear fields (slot, label,
    the five privacy parameters as :func:`privacy_bytes`) and which field it is. Changing any of
    them makes the record fail to open, so a forged clear field is detected, not just a damaged one."""
    return store_id + struct.pack("<qq", slot, label) + privacy + field


def pad_stream(tag: str) -> bytes:
    """A stream tag as sealed: its length (2 bytes), its UTF-8 bytes, zeros up to a multiple of
    ``STREAM_PAD`` bytes.

    Example:
        >>> len(pad_stream("bob")) == len(pad_stream("alice-private-notes")) == 64
        True
        >>> unpad_stream(pad_stream("bob"))
        'bob'
    """
    raw = tag.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"a stream tag of {len(raw)} bytes; at most 65535")
    n = 2 + len(raw)
    return struct.pack("<H", len(raw)) + raw + bytes(-n % STREAM_PAD)


def unpad_stream(padded: bytes) -> str:
    """The tag :func:`pad_stream` padded."""
    (n,) = struct.unpack_from("<H", padded)
    return padded[2:2 + n].decode()


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


def seal_rows(sealer: Sealer, rows: EncodedRows, slots: list[int], labels: list[int], stream: str,
              store_id: bytes, privacy: bytes) -> tuple[list[bytes], list[bytes | None], list[bytes]]:
    """Codes (with the row's scale and zero point in front), logits and stream tag (padded) of
    each row sealed under the store's key, each bound by :func:`record_aad` to the store, to its
    record's clear fields and to the field it is."""
    tag = pad_stream(stream)

    def bound(s: int, y: int, field: bytes) -> bytes:
        return record_aad(store_id, s, y, privacy, field)

    codes = [sealer.seal(_SCALE_ZP.pack(scale, zp) + c, bound(s, y, b"codes"))
             for c, scale, zp, s, y in zip(rows.code_bytes, rows.scales, rows.zero_points, slots, labels)]
    logits = [None if lb is None else sealer.seal(lb, bound(s, y, b"logits"))
              for lb, s, y in zip(rows.logit_bytes, slots, labels)]
    streams = [sealer.seal(tag, bound(s, y, b"stream")) for s, y in zip(slots, labels)]
    return codes, logits, streams


def decode_row(row: tuple[Any, ...], cap: int, code_bytes: int, num_logits: int | None,
               sealer: Sealer | None, store_id: bytes | None = None) -> tuple[str | None, bytes, bytes | None, float, int]:
    """``(problem, codes, logits, scale, zero_point)`` of a stored row: ``problem`` says why it
    cannot be trusted (types, ranges, checksum, a sealed field that does not open, blob
    lengths), else ``None``. A sealed row opens with ``store_id``'s :func:`record_aad`, its scale
    and zero point sealed with its codes; with ``store_id=None``, as the first sealed format."""
    slot, stream, label, codes, scale, zp, logits, check = row[:8]
    privacy = tuple(row[8:13])
    if not isinstance(slot, int) or not 0 <= slot < cap:
        return f"slot {slot!r} outside 0..{cap - 1}", b"", None, scale, zp
    if not isinstance(label, int) or label < 0:
        return f"label {label!r} is not a class index", b"", None, scale, zp
    if not isinstance(stream, (bytes if sealer is not None else str)):
        return "stream has the wrong type", b"", None, scale, zp
    if not isinstance(codes, bytes) or (logits is not None and not isinstance(logits, bytes)):
        return "codes or logits are not blobs", b"", None, scale, zp
    if not isinstance(scale, float) or not np.isfinite(scale) or scale <= 0 or not isinstance(zp, int):
        return f"scale {scale!r} / zero point {zp!r} out of range", b"", None, scale, zp
    if any(v is not None and not isinstance(v, (int, float)) for v in privacy):
        return "privacy parameters are not numbers", b"", None, scale, zp
    if not isinstance(check, int) or checksum(slot, stream, label, codes, scale, zp, logits, privacy) != check:
        return "checksum mismatch", b"", None, scale, zp
    if sealer is not None and store_id is not None and (scale, zp) != (SEALED_SCALE, SEALED_ZERO_POINT):
        return f"clear scale {scale!r} / zero point {zp!r} of a sealed record were changed", b"", None, scale, zp
    if sealer is not None:
        def bound(field: bytes) -> bytes:
            if store_id is None:
                return aad(slot, label, field)
            return record_aad(store_id, slot, label, privacy_bytes(privacy), field)

        try:
            codes = sealer.open(codes, bound(b"codes"))
            logits = None if logits is None else sealer.open(logits, bound(b"logits"))
            sealer.open(stream if isinstance(stream, bytes) else stream.encode(), bound(b"stream"))
        except StoreKeyError:
            return "a sealed field does not open (a damaged or forged record)", b"", None, scale, zp
        if store_id is not None:
            if len(codes) < _SCALE_ZP.size:
                return "sealed codes too short", b"", None, scale, zp
            scale, zp = _SCALE_ZP.unpack_from(codes)
            codes = codes[_SCALE_ZP.size:]
            if not np.isfinite(scale) or scale <= 0:
                return f"sealed scale {scale!r} out of range", b"", None, scale, zp
    if len(codes) != code_bytes:
        return f"codes are {len(codes)} bytes, expected {code_bytes}", b"", None, scale, zp
    if num_logits is not None and logits is not None and len(logits) != 2 * num_logits:
        return f"logits are not {2 * num_logits} bytes", b"", None, scale, zp
    return None, codes, logits, scale, zp


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
