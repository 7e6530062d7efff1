"""The export id: one random id per export, written into every ``.pte`` and ``.ptd`` and checked
before a program runs, so that a program never runs with another export's weights.

- Every ``.pte`` has a constant method ``export_id`` that returns the id (32 lowercase hex
  characters), stored in the program itself.
- Every program with a ``.ptd`` also has a method ``weights_id`` that returns the copy of the id
  stored in the ``.ptd`` (a ``uint8`` tensor of the id's 32 ASCII bytes, key ``export_id``).

An app (and :func:`check_export_id` here) calls both before any other method and refuses the
pair when they differ, or when either is missing; ``manifest.json`` records the same id. The two
methods touch nothing but the id, so a ``.ptd`` of another program (other tensors, other shapes)
is refused before a method that would read its weights is loaded: ExecuTorch itself checks
neither names against shapes nor which export a ``.ptd`` came from.

A night changes only the ``.ptd``'s weights, never its id. An export made again for the same
runtime (the engine does this when a folder cannot be patched) passes the old id on, so its
programs come out byte-identical; every other export draws a new one.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_sleep.errors import ExportError, InputError

__all__ = ["EXPORT_ID_METHOD", "WEIGHTS_ID_METHOD", "ID_KEY", "new_export_id", "check_id_value", "id_program",
           "check_export_id"]

EXPORT_ID_METHOD = "export_id"  # the .pte's constant method: the id, a string
WEIGHTS_ID_METHOD = "weights_id"  # returns the .ptd's copy: uint8 (32,), the id's ASCII bytes
ID_KEY = "export_id"  # the copy's key in the .ptd
_HEX32 = re.compile(r"[0-9a-f]{32}")


def new_export_id() -> str:
    """A new random export id: 32 lowercase hex characters (a UUID4's 128 bits)."""
    return uuid.uuid4().hex


def check_id_value(export_id: object) -> str:
    """``export_id`` if it is 32 lowercase hex characters.

    >>> check_id_value("0" * 32) == "0" * 32
    True

    Raises:
        InputError: anything else.
    """
    if not isinstance(export_id, str) or not _HEX32.fullmatch(export_id):
        raise InputError(f"export_id={export_id!r}; expected 32 lowercase hex characters (what "
                         "new_export_id() or a manifest's export_id gives), or None for a new one.")
    return export_id


class _WeightsId(nn.Module):
    """``weights_id``: the id's bytes as stored in the ``.ptd`` (``+ 0``: a program cannot return a
    constant it does not compute)."""

    def __init__(self, export_id: str) -> None:
        super().__init__()
        self.register_buffer(ID_KEY, torch.tensor(list(export_id.encode("ascii")), dtype=torch.uint8))

    def forward(self) -> torch.Tensor:
        return getattr(self, ID_KEY) + 0  # type: ignore[no-any-return]


def id_program(export_id: str, tag: str) -> torch.export.ExportedProgram:
    """The ``weights_id`` method of an export with id ``export_id``, its constant tagged for the
    ``.ptd`` ``tag``; the caller lowers it beside the program's other methods and passes
    ``constant_methods={EXPORT_ID_METHOD: export_id}``."""
    ep = torch.export.export(_WeightsId(check_id_value(export_id)), (), strict=True)
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
    return ep


def _run(program: Any, method: str) -> Any:
    return program.load_method(method).execute([])[0]


def check_export_id(program: Any, export_id: str, pte: Path, ptd: Path | None) -> None:
    """Refuse ``program`` (an ``executorch.runtime`` program loaded from ``pte`` with weights
    ``ptd``, or none) unless both carry ``export_id``. Run before loading any other method.

    Raises:
        ExportError: naming the file whose id is missing or differs.
    """
    fix = "Fix: copy the files of one export together, or re-export."
    names = set(program.method_names)
    if EXPORT_ID_METHOD not in names:
        raise ExportError(f"{str(pte)!r} has no export id (methods {sorted(names)}): it was written by an "
                          "older edge-sleep (manifest format 2) or by another tool. Fix: re-export the folder.")
    try:
        own = _run(program, EXPORT_ID_METHOD)
    except RuntimeError as e:
        raise ExportError(f"ExecuTorch could not read {str(pte)!r}'s export id ({e}). Fix: re-export.") from e
    if own != export_id:
        raise ExportError(f"{str(pte)!r} is export {own!r}; the manifest names export {export_id!r}: a program "
                          f"of another export. {fix}")
    if ptd is None:
        return
    if WEIGHTS_ID_METHOD not in names:
        raise ExportError(f"{str(pte)!r} has no {WEIGHTS_ID_METHOD} method; it takes no .ptd, yet it was "
                          f"given {str(ptd)!r}. {fix}")
    try:
        stored = _run(program, WEIGHTS_ID_METHOD)
    except RuntimeError as e:
        raise ExportError(f"{str(ptd)!r} holds no export id for {str(pte)!r} ({e}): these are not the weights "
                          f"of that program. {fix}") from e
    got = bytes(stored.numpy()).decode("ascii", errors="replace") if isinstance(stored, torch.Tensor) else stored
    if got != export_id:
        raise ExportError(f"{str(ptd)!r} holds the weights of export {got!r}, but {str(pte)!r} is export "
                          f"{export_id!r}: a .ptd of another export. {fix}")
