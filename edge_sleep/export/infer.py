"""``infer.pte`` and ``infer_int8.pte``: the inference programs, weights in a ``.ptd`` beside them.

Stages, each named after what it produces (as ExecuTorch names them):
``torch.export`` (dynamic batch) -> optional PT2E int8 quantization (dynamic activations,
per-channel symmetric weights, the XNNPACK quantizer) -> every constant tagged for the external
weights file -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner ->
``to_executorch`` with external constants. The ``.pte`` then holds the program only; a night's
new weights ship as a new ``.ptd`` for the same ``.pte``.

The program computes with the *effective* weights: :func:`inference_form` folds every adapter
(and keep-mask) into a plain ``nn.Linear`` before export, so the graph is the base architecture's
whatever the adapters, masks or nights did. That is what keeps the ``.pte`` byte-identical from
one export to the next while only the ``.ptd`` changes, and it is the fastest form to serve.

XNNPACK names each constant it reads from the ``.ptd`` by the SHA-256 of its bytes, which would
write new weights' names into the program. The export names them by their
position in the graph instead (``weights/0``, ``weights/1``, ...; :func:`positional_keys`), so
the names, and with them the ``.pte``, depend on the architecture only.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from edge_sleep.adapters import LoRALinear
from edge_sleep.export.identity import EXPORT_ID_METHOD, WEIGHTS_ID_METHOD, check_id_value, id_program, new_export_id
from edge_sleep.export.layout import Layout, export_with_layout, unread_tensors
from edge_sleep.export.release import releases_export_state
from edge_sleep.modelio import logits_of

__all__ = ["ProgramFiles", "to_infer_program", "inference_form", "positional_keys", "edge_config", "WEIGHTS_TAG"]

WEIGHTS_TAG = "weights"  # the .ptd file's stem: weights.ptd (int8: weights_int8.ptd)


@dataclass(frozen=True)
class ProgramFiles:
    """An exported program: the ``.pte`` bytes, its external data files ``{stem: bytes}``, where
    its learned tensors lie in its one ``.ptd`` (``None``: not known) and, when asked for, its
    ETRecord (the graphs ``edge-sleep profile`` maps timings back to)."""

    program: bytes
    data: dict[str, bytes]
    etrecord: bytes | None = None
    layout: Layout | None = None
    export_id: str = ""


class _Logits(nn.Module):
    """``model``'s forward returning the logits tensor (a Hugging Face output's ``.logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


@torch.no_grad()
def inference_form(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode that computes the same logits with plain layers.

    Every :class:`LoRALinear` becomes an ``nn.Linear`` holding its effective weight
    ``W + s * (B @ A) * mask``; the output is the logits tensor. The original is not touched.
    """
    import copy

    clone = copy.deepcopy(model).cpu().eval()
    for name, m in list(clone.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.weight.dtype)
        plain.weight.copy_(m.effective_weight())
        if m.bias is not None:
            plain.bias.copy_(m.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, plain)
    for p in clone.parameters():
        p.requires_grad_(False)
    return _Logits(clone).eval()


_KEYS_LOCK = threading.Lock()


class _PositionalKeys:
    """Stands in for ``hashlib`` inside XNNPACK's serializer: a constant's key is its visit number."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.count = prefix, 0

    def sha256(self, data: bytes = b"") -> _PositionalKeys._Key:
        key = self._Key(f"{self.prefix}/{self.count}")
        self.count += 1
        return key

    class _Key:
        def __init__(self, key: str) -> None:
            self.key = key

        def hexdigest(self) -> str:
            return self.key


@contextmanager
def positional_keys(module: Any, prefix: str) -> Iterator[None]:
    """Within the block, ``module``'s ``hashlib.sha256(data).hexdigest()`` gives ``prefix/0``, ``prefix/1``...

    ExecuTorch names and deduplicates constants by the hash of their bytes (XNNPACK's serializer
    keys the ``.ptd`` by it; the emitter shares one buffer between equal constants). Either puts
    the weights' values into the program. With positional keys the program depends on the graph
    only, and no two constants are merged because they happen to hold equal values today.
    """
    with _KEYS_LOCK:
        original = module.hashlib
        module.hashlib = _PositionalKeys(prefix)
        try:
            yield
        finally:
            module.hashlib = original


def _returns_tensor_list(ep: torch.export.ExportedProgram) -> bool:
    """Whether an operator in ``ep`` returns a ``Tensor[]`` (``split``, ``unbind``, ``chunk``...)."""
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and any(
                r.type == torch.ListType.ofTensors() for r in schema.returns):
            return True
    return False


def edge_config(ep: torch.export.ExportedProgram) -> Any:
    """``to_edge``'s config for ``ep``: ExecuTorch's IR checks, unless an operator returns a ``Tensor[]``.

    ExecuTorch's dtype check reads such an operator's list of outputs as if each were one return
    and takes ``len()`` of the first tensor: a symbolic batch then becomes the example's batch
    (GPT-2's ``split`` of the fused query/key/value projection, along the last dimension, turned a
    program with a dynamic batch into one of batch 2). Those graphs skip the check.
    """
    from executorch.exir import EdgeCompileConfig

    return EdgeCompileConfig(_check_ir_validity=not _returns_tensor_list(ep))


def _dynamic_batch(example: torch.Tensor, max_batch: int) -> tuple[dict[int, Dim]]:
    return ({0: Dim("batch", min=1, max=max_batch)},)


@releases_export_state
def to_infer_program(model: nn.Module, example: torch.Tensor, *, int8: bool = False, max_batch: int = 64,
                     calibration: list[torch.Tensor] | None = None, etrecord: bool = False,
                     export_id: str | None = None) -> ProgramFiles:
    """Export ``model``'s forward as an XNNPACK-delegated ExecuTorch program with a dynamic batch.

    Args:
        model: returns logits ``(B, C)`` for an input ``(B, *example.shape[1:])``; put in eval mode.
        example: an example batch of at least 2 rows (a batch of 1 would be specialised).
        int8: PT2E-quantize: int8 per-channel weights, dynamically quantized activations.
        max_batch: the largest batch the program accepts.
        calibration: batches run through the prepared model before conversion (int8 only;
            default: ``example``).
        etrecord: also return the ETRecord for profiling (about the size of the weights).
        export_id: the id written into the ``.pte`` and the ``.ptd`` (:mod:`edge_sleep.export.
            identity`; default: a new one).

    Returns:
        :class:`ProgramFiles` with the ``.pte`` (methods ``forward``, ``export_id`` and
        ``weights_id``) and one ``.ptd`` holding every weight and the id.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    tag = WEIGHTS_TAG + ("_int8" if int8 else "")
    export_id = new_export_id() if export_id is None else check_id_value(export_id)
    was_training = model.training
    model.eval()
    record: list[bytes] = []

    def export(module: nn.Module, unused: set[str]) -> tuple[bytes, bytes]:
        shapes = _dynamic_batch(example, max_batch)
        graph = torch.export.export(module, (example,), dynamic_shapes=shapes, strict=True).module()
        if int8:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(
                get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
            prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
            with torch.no_grad():
                for batch in calibration or [example]:
                    prepared(batch)
            graph = convert_pt2e(prepared)
        delegate_external_constants_pass_unlifted(module=graph, gen_tag_fn=lambda _: tag)
        ep = torch.export.export(graph, (example,), dynamic_shapes=shapes, strict=True)
        unused.update(unread_tensors(ep))
        from executorch.backends.xnnpack.operators import node_visitor

        with positional_keys(node_visitor, tag):
            lowered = to_edge_transform_and_lower({"forward": ep, WEIGHTS_ID_METHOD: id_program(export_id, tag)},
                                                  partitioner=[XnnpackPartitioner()], compile_config=edge_config(ep),
                                                  constant_methods={EXPORT_ID_METHOD: export_id},
                                                  generate_etrecord=etrecord)
        from executorch.exir.emit import _emitter

        with positional_keys(_emitter, tag):  # constants outside XNNPACK (embeddings...) as well
            program = lowered.to_executorch(ExecutorchBackendConfig(external_constants=lambda _: tag))
        if etrecord:
            buffer = io.BytesIO()
            rec = program.get_etrecord()
            if isinstance(rec.edge_dialect_program, dict):  # the Inspector reads one method's graph
                rec.edge_dialect_program = rec.edge_dialect_program["forward"]
            rec.save(buffer)
            record[:] = [buffer.getvalue()]
        (blob,) = program._tensor_data.values()
        return bytes(program.buffer), bytes(blob)

    try:
        if int8 or etrecord:  # quantized weights are no probe's bytes; an ETRecord records the values
            program, data = export(model, set())
            layout = None
        else:
            program, data, layout = export_with_layout(model, export)
    finally:
        model.train(was_training)
    return ProgramFiles(program=program, data={tag: data}, etrecord=record[0] if record else None, layout=layout,
                        export_id=export_id)
