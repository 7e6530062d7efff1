"""Run an exported program from Python through the ExecuTorch runtime, with its inputs checked.

On a phone the app's ExecuTorch runtime loads the same ``.pte`` and ``.ptd``; this runner is how
the conformance tests, the latency benchmark and a Linux board run them. ExecuTorch runs its own
thread pool: ``torch.set_num_threads(1)`` in the process keeps torch's from competing with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_sleep.errors import ExportError, InputError
from edge_sleep.export.manifest import Manifest, read_manifest

__all__ = ["ExportedProgram", "load_program"]

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class ExportedProgram:
    """One loaded ExecuTorch program (``infer`` or ``infer_int8``) of an export folder.

    Call it with a batch ``(B, *input_shape)`` (``1 <= B <= max_batch``) to get logits ``(B, C)``.
    """

    def __init__(self, directory: Path, manifest: Manifest, name: str) -> None:
        from executorch.runtime import Runtime

        self.directory, self.manifest, self.name = directory, manifest, name
        files = manifest.programs[name]
        manifest.verify(directory, [files["pte"], files["ptd"]])
        pte, ptd = directory / files["pte"], directory / files["ptd"]
        try:
            program = Runtime.get().load_program(pte, data_path=ptd)
            self._method = program.load_method("forward")
        except RuntimeError as e:
            raise ExportError(f"ExecuTorch could not load {str(pte)!r} with weights {str(ptd)!r} ({e}). Fix: "
                              "re-export the folder with this edge-sleep and executorch.") from e

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` of a checked input batch.

        Raises:
            InputError: not a tensor, wrong per-example shape or dtype, batch outside
                ``[1, max_batch]``, or NaN/inf values. The program is not run then.
        """
        m = self.manifest
        want = (tuple(m.input_shape), _DTYPES[m.input_dtype])
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.name} got a {type(x).__name__}; expected a torch.Tensor batch.")
        if tuple(x.shape[1:]) != want[0] or x.dtype != want[1] or x.ndim < 1:
            raise InputError(f"{self.name} got shape {tuple(x.shape)} of dtype {x.dtype}; expected (B, "
                             f"{', '.join(map(str, want[0]))}) of dtype {want[1]}. Fix: reshape or cast the batch.")
        if not 1 <= x.shape[0] <= m.max_batch:
            raise InputError(f"{self.name} got a batch of {x.shape[0]}; the program takes 1 to {m.max_batch}. "
                             "Fix: split the batch, or export with a larger max_batch.")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise InputError(f"{self.name} got NaN or inf in its input; expected finite values.")
        return self._method.execute([x.contiguous()])[0]


def load_program(directory: str | Path, name: str = "infer") -> ExportedProgram:
    """Load the program ``name`` of an export folder after checking its files against the manifest.

    Raises:
        ExportError: no manifest, unknown program, a file missing, truncated, edited or from
            another export, or ExecuTorch refusing it.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if name not in manifest.programs or "pte" not in manifest.programs[name]:
        known = sorted(k for k, v in manifest.programs.items() if "pte" in v)
        raise ExportError(f"{str(directory)!r} has no program {name!r}; it has {known}.")
    return ExportedProgram(directory, manifest, name)
