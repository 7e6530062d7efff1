"""``edge-sleep profile``: ExecuTorch's per-operator timing of an exported inference program.

The program runs ``runs`` times with ETDump enabled; ExecuTorch's ``Inspector`` then reads the
dump (and the ETRecord, when the folder was exported with ``etrecord=True``, to name the
operators inside XNNPACK's delegate) and gives each event's p10/p50/p90. The same files profile
the same way on a phone with the ExecuTorch devtools.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from edge_sleep.errors import ExportError, InputError
from edge_sleep.export.manifest import read_manifest
from edge_sleep.export.runner import inference_files

__all__ = ["profile_program", "format_profile", "resolve_program"]

_COLUMNS = ["event_block_name", "event_name", "p10 (ms)", "p50 (ms)", "p90 (ms)", "avg (ms)",
            "is_delegated_op", "delegate_backend_name"]


def resolve_program(path: str | Path) -> tuple[Path, str]:
    """``infer.pte`` in an export folder, or the folder itself (its ``infer``) -> ``(folder, name)``."""
    path = Path(path)
    if path.suffix == ".pte":
        return path.parent, path.stem
    if path.is_dir():
        return path, "infer"
    raise ExportError(f"{str(path)!r} is neither a .pte file nor an export folder. Fix: pass the infer.pte "
                      "that `edge-sleep export` wrote, or its folder.")


def profile_program(directory: str | Path, name: str = "infer", *, runs: int = 50, batch: int = 1,
                    seed: int = 0) -> Any:
    """Run program ``name`` of an export folder ``runs`` times on random inputs and time every event.

    Returns:
        A pandas ``DataFrame`` (one row per event, timings in milliseconds).

    Raises:
        ExportError: a file is missing or does not match the manifest; InputError: bad ``runs`` or
            ``batch``.
    """
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    directory = Path(directory)
    manifest = read_manifest(directory)
    files = inference_files(directory, manifest, name)
    if not isinstance(runs, int) or runs < 1:
        raise InputError(f"runs={runs!r}; expected an integer >= 1.")
    if not isinstance(batch, int) or not 1 <= batch <= manifest.max_batch:
        raise InputError(f"batch={batch!r}; the program takes 1 to {manifest.max_batch}.")
    manifest.verify(directory, list(files.values()))
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *manifest.input_shape)
    x = (torch.rand(shape, generator=g) if manifest.input_dtype == "float32"
         else torch.randint(0, 100, shape, generator=g))
    # timings only: no debug buffer (a buffer for intermediate outputs runs out at large batches
    # and aborts the process)
    program = Runtime.get().load_program(directory / files["pte"], data_path=directory / files["ptd"],
                                         enable_etdump=True)
    method = program.load_method("forward")
    for _ in range(runs):
        method.execute([x])
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "run.etdump"
        program.write_etdump_result_to_file(str(dump), str(Path(tmp) / "debug.bin"))
        record = files.get("etrecord")
        inspector = Inspector(etdump_path=str(dump), etrecord=None if record is None else str(directory / record))
        frame = inspector.to_dataframe()
    keep = [c for c in _COLUMNS if c in frame.columns]
    return frame[keep]


def format_profile(frame: Any, top: int = 25) -> str:
    """The slowest ``top`` events by median, as a plain-text table."""
    shown = frame.sort_values("p50 (ms)", ascending=False).head(top)
    return str(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
