"""The on-device programs: ExecuTorch (XNNPACK) and ONNX exports of an :class:`EdgeSleep` model.

``export_programs(es, example_input, out_dir)`` writes, atomically:

- ``infer.pte`` + ``weights.ptd``: fp32 inference, dynamic batch, every weight in the ``.ptd``;
- ``infer_int8.pte`` + ``weights_int8.ptd``: PT2E int8 (per-channel weights, dynamic activations);
- ``model.onnx``: the same graph for ONNX Runtime, checked with ``onnx.checker``;
- ``manifest.json``: SHA-256 of every file, the input shape and dtype, the model fingerprint the
  replay store uses, the LoRA rank and targets.

The ``.pte`` files hold no weights, so after a night only the ``.ptd`` files change; a test
checks that re-exporting after a night gives byte-identical programs. :func:`load_program` runs
a program from Python with its files verified and its inputs checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edge_sleep.adapters import lora_modules
from edge_sleep.errors import CallOrderError, InputError
from edge_sleep.export.infer import ProgramFiles, inference_form, to_infer_program
from edge_sleep.export.manifest import MANIFEST_FORMAT_VERSION, Manifest, read_manifest
from edge_sleep.export.onnx import to_onnx
from edge_sleep.export.runner import ExportedProgram, load_program

if TYPE_CHECKING:
    from edge_sleep.runtime import EdgeSleep

__all__ = ["export_programs", "export_onnx", "load_program", "read_manifest", "Manifest", "ExportedProgram",
           "ProgramFiles", "inference_form", "to_infer_program", "to_onnx", "MANIFEST_FORMAT_VERSION"]


def _example_batch(es: EdgeSleep, example: torch.Tensor | None) -> torch.Tensor:
    from edge_sleep.runtime import EdgeSleep

    if not isinstance(es, EdgeSleep):
        raise InputError(f"es is a {type(es).__name__}; expected an EdgeSleep runtime. Fix: wrap the model "
                         "with EdgeSleep(model, ...) or load a checkpoint with EdgeSleep.load.")
    if es.input_spec is None or es.num_classes is None:
        raise CallOrderError("export_programs() needs a runtime that has learned at least one batch (the "
                             "input shape and class count come from it); call learn() first, or load a "
                             "checkpoint saved after learning.")
    shape, is_float = es.input_spec
    if example is None:
        example = torch.zeros((2, *shape), dtype=torch.float32 if is_float else torch.int64)
    example = es._check_input(example, "example_input").cpu()
    example = example.float() if example.is_floating_point() else example
    if example.shape[0] == 1:  # a batch of one would be specialised by torch.export
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example


def _check_max_batch(max_batch: object) -> int:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 2:
        raise InputError(f"max_batch={max_batch!r}; expected an integer >= 2.")
    return max_batch


def export_onnx(es: EdgeSleep, example_input: torch.Tensor | None, path: str | Path, *,
                max_batch: int = 64) -> Path:
    """Write ``es``'s model as one ONNX file (input ``x``, output ``logits``, dynamic batch).

    The graph computes with the effective weights (adapters folded in), checked with
    ``onnx.checker``. Returns the path written.
    """
    max_batch = _check_max_batch(max_batch)
    x = _example_batch(es, example_input)
    data = to_onnx(inference_form(es.model), x, max_batch=max_batch)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def export_programs(es: EdgeSleep, example_input: torch.Tensor | None, out_dir: str | Path, *,
                    int8: bool = True, onnx: bool = True, max_batch: int = 64) -> Manifest:
    """Export ``es``'s model as the on-device programs into ``out_dir`` (replaced atomically).

    Args:
        es: the runtime; its model (with adapters, masks and all) is exported as it is now.
        out_dir: the export folder; an existing one is replaced only once the new one is complete.
        example_input: an example batch, or ``None`` for zeros of the shape the runtime has
            learned from.
        int8: also write ``infer_int8.pte``.
        onnx: also write ``model.onnx``.
        max_batch: the largest batch the programs accept.

    Returns:
        The written :class:`Manifest`.

    Raises:
        CallOrderError: the runtime has not learned anything yet (no input shape).
        InputError: ``example_input`` does not match the runtime's inputs, or ``max_batch < 2``.
    """
    max_batch = _check_max_batch(max_batch)
    x = _example_batch(es, example_input)
    model = inference_form(es.model)
    mods = lora_modules(es.model)
    first = next(iter(mods.values()), None)
    manifest = Manifest(
        fingerprint=es.fingerprint, input_shape=list(x.shape[1:]),
        input_dtype="float32" if x.is_floating_point() else "int64", max_batch=max_batch,
        num_classes=int(es.num_classes or 0),
        lora=None if first is None else {"rank": first.rank, "alpha": first.scaling * first.rank,
                                         "targets": sorted(mods)},
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, quantized in (("infer", False), ("infer_int8", True)):
            if quantized and not int8:
                continue
            files = to_infer_program(model, x, int8=quantized, max_batch=max_batch)
            (stem, data), = files.data.items()
            manifest.add_file(tmp, f"{name}.pte", files.program)
            manifest.add_file(tmp, f"{stem}.ptd", data)
            manifest.programs[name] = {"pte": f"{name}.pte", "ptd": f"{stem}.ptd"}
        if onnx:
            manifest.add_file(tmp, "model.onnx", to_onnx(model, x, max_batch=max_batch))
            manifest.programs["onnx"] = {"onnx": "model.onnx"}
        manifest.write(tmp)
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
