"""``model.onnx``: the inference graph for ONNX Runtime, checked with ``onnx.checker``."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn
from torch.export import Dim

from edge_sleep.export.release import releases_export_state

__all__ = ["to_onnx"]


@releases_export_state
def to_onnx(model: nn.Module, example: torch.Tensor, *, max_batch: int = 64) -> bytes:
    """Export ``model``'s forward to one self-contained ONNX file (opset of the dynamo exporter).

    Args:
        model: returns logits ``(B, C)``; exported in eval mode.
        example: an example batch of at least 2 rows; the batch dimension stays dynamic.
        max_batch: the largest batch the export's shape constraints allow.

    Returns:
        The ``.onnx`` bytes (weights inside), already validated by ``onnx.checker.check_model``.
    """
    import onnx

    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress chatter
            program = torch.onnx.export(model, (example,), dynamo=True, external_data=False, verbose=False,
                                        dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},),
                                        input_names=["x"], output_names=["logits"])
    finally:
        model.train(was_training)
    assert program is not None
    buf = io.BytesIO()
    program.save(buf)  # type: ignore[arg-type]
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data
