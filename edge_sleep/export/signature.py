"""The manifest's ``signatures``: every program's methods, their inputs and outputs in order.

An app drives the export folder from the manifest alone: which method to call, what to pass in
which order (shapes with the dynamic dimensions named, dtypes), what comes back, and the
conventions a step follows. Shapes are lists of integers and names: ``"batch"`` is 1 to
``max_batch``; ``"distill"`` and ``"label"`` are 1 to ``max_replay``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["infer_signature", "train_signature", "HYPER"]

#: ``train.pte``'s ``hyper`` input, in order.
HYPER = ["lr", "max_grad_norm", "replay_alpha", "replay_beta"]


def _tensor(name: str, shape: list[Any], dtype: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype, **extra}


def infer_signature(input_shape: list[int], input_dtype: str, num_classes: int) -> dict[str, Any]:
    """``infer.pte``'s (and ``infer_int8.pte``'s) one method."""
    return {"forward": {"inputs": [_tensor("x", ["batch", *input_shape], input_dtype)],
                        "outputs": [_tensor("logits", ["batch", num_classes], "float32")]}}


def train_signature(input_shape: list[int], input_dtype: str, num_classes: int, max_replay: int,
                    adapters: dict[str, list[int]]) -> dict[str, Any]:
    """``train.pte``'s methods ``step`` and ``logits``; ``adapters`` is ``{name: shape}`` in order."""
    x = ["batch", *input_shape]
    inputs = [_tensor("x", x, input_dtype), _tensor("y", ["batch"], "int64")]
    if max_replay:
        inputs += [_tensor("x_distill", ["distill", *input_shape], input_dtype),
                   _tensor("z_distill", ["distill", num_classes], "float32"),
                   _tensor("x_label", ["label", *input_shape], input_dtype),
                   _tensor("y_label", ["label"], "int64")]
    inputs.append(_tensor("hyper", [4], "float32", values=HYPER))
    adapter_in = [_tensor(n, list(s), "float32") for n, s in adapters.items()]
    outputs = [_tensor("loss", [], "float32"), _tensor("new_loss", [], "float32"),
               _tensor("replay_loss", [], "float32"), _tensor("penalty", [], "float32"),
               _tensor("grad_norm", [], "float32"),
               _tensor("status", [], "int64", codes={"0": "applied", "1": "non-finite loss",
                                                     "2": "non-finite gradient", "3": "non-finite weights"}),
               _tensor("logits", ["batch", num_classes], "float32"),
               *[_tensor(f"new {n}", list(s), "float32") for n, s in adapters.items()]]
    conventions = [
        "one call is one wake step: loss, gradient, clipping to max_grad_norm (inf: off), the finite "
        "checks and the SGD update of the adapters",
        "keep the adapters yourself: pass them in, keep what comes out (unchanged when status != 0)",
        "the anchor's cap min(lambda F, 1 / (2 lr)) is taken with the lr passed in",
    ]
    if max_replay:
        conventions.append("a step without a replay term passes one row of zeros for it and a weight of 0 "
                           "in hyper (replay_alpha for x_distill/z_distill, replay_beta for x_label/y_label)")
    return {"step": {"inputs": [*inputs, *adapter_in], "outputs": outputs, "conventions": conventions},
            "logits": {"inputs": [_tensor("x", x, input_dtype), *adapter_in],
                       "outputs": [_tensor("logits", ["batch", num_classes], "float32")]}}
