"""``manifest.json``: what an export folder holds, with a SHA-256 for every file.

An app (or :func:`edge_sleep.export.load_program`) reads the manifest first and refuses a folder
whose files do not match it: a truncated ``.pte``, a ``.ptd`` from another export, a file edited
by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_sleep.errors import ExportError, check_format_version

__all__ = ["Manifest", "MANIFEST_FORMAT_VERSION", "sha256_of", "read_manifest"]

MANIFEST_FORMAT_VERSION = 3  # 2: train.pte's one-call step, layouts; 3: the export id


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    """The contents of an export folder.

    Attributes:
        fingerprint: the model fingerprint the replay store uses (same architecture, same value).
        input_shape: per-example input shape (the batch dimension is dynamic, 1 to ``max_batch``).
        input_dtype: ``"float32"`` or ``"int64"`` (token ids).
        max_batch: the largest batch the programs accept.
        num_classes: logits per example.
        lora: ``{"rank", "alpha", "targets"}`` of the adapters, or ``None`` without adapters.
        max_replay: the largest replay batch ``train.pte`` takes (0: it takes no replay inputs, or
            there is no ``train.pte``).
        adapters: the trainable tensors of ``train.pte`` in the order its ``logits`` method takes
            them (empty without it).
        programs: ``{name: {"pte": file, "ptd": file}}`` for the ExecuTorch programs, and
            ``{"onnx": {"onnx": file}}`` for the ONNX graph.
        files: ``{file: {"sha256", "bytes"}}`` for every file in the folder but the manifest.
        signatures: ``{program: {method: {"inputs", "outputs"[, "conventions"]}}}``: what each
            method takes and returns, in order (:mod:`edge_sleep.export.signature`).
        hyperparameters: the wake step's settings at export (``lr``, ``max_grad_norm``,
            ``replay_alpha``, ``replay_beta``, ``replay_batch``, ``anchor_lambda``), the values an
            app passes in ``hyper``.
        layouts: ``{ptd file: {tensor: {"shape", "dtype", "offsets"}}}``: where each learned tensor's
            bytes lie in that ``.ptd`` (:mod:`edge_sleep.export.layout`), so a night's new weights
            are written in place of the old ones without an export. A ``.ptd`` without an entry
            (int8 weights, convolutions) needs a new export after a night.
        night: the night's settings at export (``lr``, ``label_weight``, ``distill_weight``,
            ``noise_std``, ``batch_size``, ``fisher_steps``, ``fisher_batch``) and the ``weights``
            ``night.pte``'s methods take and return, in order (empty without ``night.pte``).
        dims: ``{name: [min, max]}`` of the dynamic dimensions the signatures name.
        export_id: the id every ``.pte`` and ``.ptd`` of the folder carries
            (:mod:`edge_sleep.export.identity`), checked before a program runs.
    """

    fingerprint: str
    input_shape: list[int]
    input_dtype: str
    max_batch: int
    num_classes: int
    lora: dict[str, Any] | None
    max_replay: int = 0
    adapters: list[str] = field(default_factory=list)
    programs: dict[str, dict[str, str]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    night: dict[str, Any] = field(default_factory=dict)
    dims: dict[str, list[int]] = field(default_factory=dict)
    export_id: str = ""
    format_version: int = MANIFEST_FORMAT_VERSION

    def add_file(self, directory: Path, name: str, data: bytes) -> None:
        """Write ``data`` to ``directory / name`` and record its hash and size."""
        (directory / name).write_bytes(data)
        self.files[name] = {"sha256": sha256_of(data), "bytes": len(data)}

    def write(self, directory: Path) -> Path:
        """Write ``manifest.json`` into ``directory``."""
        path = directory / "manifest.json"
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        return path

    def verify(self, directory: Path, names: list[str] | None = None) -> None:
        """Check that the files (``names``, default all) exist with the recorded hashes.

        Raises:
            ExportError: a file is missing, or its size or hash differs from the manifest.
        """
        for name in names if names is not None else list(self.files):
            want = self.files.get(name)
            if want is None:
                raise ExportError(f"{name!r} is not listed in {str(directory / 'manifest.json')!r}; "
                                  f"expected one of {sorted(self.files)}. Fix: re-export the folder.")
            path = directory / name
            if not path.is_file():
                raise ExportError(f"{str(path)!r} is missing; the manifest lists it. Fix: re-export, or copy "
                                  "the whole export folder.")
            data = path.read_bytes()
            if len(data) != want["bytes"] or sha256_of(data) != want["sha256"]:
                raise ExportError(
                    f"{str(path)!r} does not match the manifest ({len(data)} bytes, sha256 "
                    f"{sha256_of(data)[:12]}..., expected {want['bytes']} bytes, {want['sha256'][:12]}...): "
                    "it is truncated, edited or from another export. Fix: copy the files of one export "
                    "together, or re-export.")


def read_manifest(directory: str | Path) -> Manifest:
    """Read ``manifest.json`` from an export folder (no file is hashed yet).

    Raises:
        ExportError: the manifest is missing or unreadable.
        FormatVersionError: written by a newer edge-sleep.
    """
    path = Path(directory) / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"no manifest at {str(path)!r}; expected a folder written by edge_sleep.export."
                          "export_programs or `edge-sleep export`. Fix: check the path.") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{str(path)!r} is not a readable manifest ({e}). Fix: re-export.") from e
    if not isinstance(raw, dict):
        raise ExportError(f"{str(path)!r} holds {type(raw).__name__}; expected a JSON object. Fix: re-export.")
    check_format_version(f"manifest {str(path)!r}", raw.get("format_version"), MANIFEST_FORMAT_VERSION)
    if raw.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ExportError(f"{str(path)!r} has format_version={raw.get('format_version')!r}: an export by an older "
                          f"edge-sleep, whose files carry no export id (format {MANIFEST_FORMAT_VERSION}). "
                          "Fix: re-export the folder.")
    try:
        return Manifest(**raw)
    except TypeError as e:
        raise ExportError(f"{str(path)!r} has unexpected or missing keys ({e}). Fix: re-export.") from e

