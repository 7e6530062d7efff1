"""Run an exported program from Python through the ExecuTorch runtime, with its inputs checked.

On a phone the app's ExecuTorch runtime loads the same ``.pte`` and ``.ptd``; this runner is how
the conformance tests, the latency benchmark and a Linux board run them. ExecuTorch runs its own
thread pool: ``torch.set_num_threads(1)`` in the process keeps torch's from competing with it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from edge_sleep.errors import ExportError, InputError
from edge_sleep.export.identity import check_export_id
from edge_sleep.export.manifest import Manifest, read_manifest
from edge_sleep.export.signature import check_signature

__all__ = ["ExportedProgram", "load_program", "inference_files", "open_program"]

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def open_program(directory: Path, manifest: Manifest, name: str) -> Any:
    """Program ``name`` of an export folder (an ``executorch.runtime`` program, no method loaded
    yet but the export id's), after every check that can be made before its weights are read:

    1. its ``.pte`` and ``.ptd`` exist with the manifest's sizes and hashes;
    2. the ``.pte``'s export id and the ``.ptd``'s equal the manifest's
       (:func:`edge_sleep.export.identity.check_export_id`);
    3. its methods take and return what the manifest's signature says
       (:func:`edge_sleep.export.signature.check_signature`).

    Raises:
        ExportError: naming the file and the mismatch.
    """
    from executorch.runtime import Runtime

    files = manifest.programs[name]
    ptd_name = files.get("ptd")
    manifest.verify(directory, [files["pte"], *([ptd_name] if ptd_name else [])])
    pte, ptd = directory / files["pte"], (directory / ptd_name if ptd_name else None)
    try:
        program = Runtime.get().load_program(pte, data_path=ptd) if ptd else Runtime.get().load_program(pte)
    except RuntimeError as e:
        raise ExportError(f"ExecuTorch could not load {str(pte)!r}"
                          f"{f' with weights {str(ptd)!r}' if ptd else ''} ({e}). Fix: re-export the folder "
                          "with this edge-sleep and executorch.") from e
    check_export_id(program, manifest.export_id, pte, ptd)
    if name in manifest.signatures:
        check_signature(program, manifest.signatures[name], {d: hi for d, (_, hi) in manifest.dims.items()}, pte)
    return program


class ExportedProgram:
    """One loaded ExecuTorch program (``infer`` or ``infer_int8``) of an export folder.

    Call it with a batch ``(B, *input_shape)`` (``1 <= B <= max_batch``) to get logits ``(B, C)``.
    """

    def __init__(self, directory: Path, manifest: Manifest, name: str) -> None:
        self.directory, self.manifest, self.name = directory, manifest, name
        self._shape = tuple(manifest.input_shape)
        self._dtype = _DTYPES[manifest.input_dtype]
        program = open_program(directory, manifest, name)
        try:
            self._method = program.load_method("forward")
        except RuntimeError as e:
            raise ExportError(f"ExecuTorch could not load {name}'s forward in {str(directory)!r} ({e}). Fix: "
                              "re-export the folder with this edge-sleep and executorch.") from e

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` of a checked input batch.

        Raises:
            InputError: not a tensor, wrong per-example shape or dtype, batch outside
                ``[1, max_batch]``, or NaN/inf values. The program is not run then.
        """
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.name} got a {type(x).__name__}; expected a torch.Tensor batch.")
        if x.ndim < 1 or x.shape[1:] != self._shape or x.dtype != self._dtype:
            raise InputError(f"{self.name} got shape {tuple(x.shape)} of dtype {x.dtype}; expected (B, "
                             f"{', '.join(map(str, self._shape))}) of dtype {self._dtype}. Fix: reshape or cast "
                             "the batch.")
        if not 1 <= x.shape[0] <= self.manifest.max_batch:
            raise InputError(f"{self.name} got a batch of {x.shape[0]}; the program takes 1 to "
                             f"{self.manifest.max_batch}. Fix: split the batch, or export with a larger max_batch.")
        # a finite sum proves every value finite (one pass, no mask); only if it is not, look closer
        if x.is_floating_point() and not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
            raise InputError(f"{self.name} got NaN or inf in its input; expected finite values.")
        return self._method.execute([x.contiguous()])[0]


def inference_files(directory: Path, manifest: Manifest, name: str) -> dict[str, str]:
    """The files of inference program ``name`` in ``manifest``.

    Raises:
        ExportError: ``name`` is ``train`` (driven by the engine) or not an inference program.
    """
    known = sorted(k for k, v in manifest.programs.items() if "ptd" in v and k != "train")
    if name == "train" and "train" in manifest.programs:
        raise ExportError("load_program() runs the inference programs; train.pte is driven by "
                          "EdgeSleep(..., engine='executorch') (edge_sleep.engines.executorch_engine).")
    if name not in known:
        raise ExportError(f"{str(directory)!r} has no inference program {name!r}; it has {known}.")
    return manifest.programs[name]


def load_program(directory: str | Path, name: str = "infer") -> ExportedProgram:
    """Load the program ``name`` of an export folder after checking its files against the manifest.

    Raises:
        ExportError: no manifest, unknown program, a file missing, truncated, edited or from
            another export, or ExecuTorch refusing it.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    inference_files(directory, manifest, name)
    return ExportedProgram(directory, manifest, name)
