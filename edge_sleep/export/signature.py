"""The manifest's ``signatures``: every program's methods, their inputs and outputs in order.

An app drives the export folder from the manifest alone: which method to call, what to pass in
which order (shapes with the dynamic dimensions named, dtypes), what comes back, and the
conventions a step follows. Shapes are lists of integers and names of dynamic dimensions, whose
ranges the manifest's ``dims`` gives: ``"batch"`` is 1 to ``max_batch``, ``"distill"`` and
``"label"`` 1 to ``max_replay``, ``"numel"`` 2 to the largest weight matrix's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_sleep.errors import ExportError
from edge_sleep.export.identity import EXPORT_ID_METHOD, WEIGHTS_ID_METHOD

__all__ = ["infer_signature", "train_signature", "night_signature", "consolidate_signature", "id_signatures", "check_signature",
           "HYPER"]

#: ``train.pte``'s ``hyper`` input, in order.
HYPER = ["lr", "max_grad_norm", "replay_alpha", "replay_beta"]


def _tensor(name: str, shape: list[Any], dtype: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype, **extra}


#: ExecuTorch's ``ScalarType`` codes (``MethodMeta``'s dtypes) of the dtypes a signature names.
_SCALAR_TYPES = {"uint8": 0, "int64": 4, "float32": 6}


def id_signatures(with_ptd: bool = True) -> dict[str, Any]:
    """The methods that carry the export id (:mod:`edge_sleep.export.identity`), in every program."""
    first = "call before any other method; refuse the program unless the manifest's export_id"
    out: dict[str, Any] = {EXPORT_ID_METHOD: {
        "inputs": [], "outputs": [{"name": "export_id", "shape": [], "dtype": "string"}],
        "conventions": [first + (f" and {WEIGHTS_ID_METHOD}'s bytes equal it" if with_ptd else " equals it")]}}
    if with_ptd:
        out[WEIGHTS_ID_METHOD] = {
            "inputs": [], "outputs": [_tensor("weights_id", [32], "uint8")],
            "conventions": ["the export id stored in the .ptd, as 32 ASCII bytes; it reads nothing else from "
                            "the .ptd, so a foreign .ptd is found before a method that reads its weights loads"]}
    return out


def check_signature(program: Any, signature: dict[str, Any], bounds: dict[str, int], pte: Path) -> None:
    """Refuse ``program`` (an ``executorch.runtime`` program read from ``pte``) unless every method
    of the manifest's ``signature`` is in it with those inputs and outputs, in order: their count,
    dtypes and shapes, a named dimension at its bound (``bounds``, e.g. ``{"batch": 64}``).

    Raises:
        ExportError: naming the method, the tensor and both values.
    """
    have = set(program.method_names)
    fix = "Fix: re-export the folder (the manifest and the program disagree: edited, or of two exports)."
    for method, sig in signature.items():
        if method not in have:
            raise ExportError(f"the manifest lists method {method!r} of {str(pte)!r}, which has {sorted(have)}. {fix}")
        if method == EXPORT_ID_METHOD:
            continue  # a constant method: its one output is a string, checked by value
        meta = program.metadata(method)
        for kind, count, info in (("inputs", meta.num_inputs(), meta.input_tensor_meta),
                                  ("outputs", meta.num_outputs(), meta.output_tensor_meta)):
            want = sig[kind]
            if count != len(want):
                raise ExportError(f"{str(pte)!r}'s method {method!r} has {count} {kind}; the manifest's signature "
                                  f"lists {len(want)} ({[w['name'] for w in want]}). {fix}")
            for i, w in enumerate(want):
                shape = [bounds[d] if isinstance(d, str) else d for d in w["shape"]]
                got = info(i)
                if got.dtype() != _SCALAR_TYPES.get(w["dtype"]) or list(got.sizes()) != shape:
                    raise ExportError(
                        f"{str(pte)!r}'s method {method!r}: {kind[:-1]} {i} ({w['name']!r}) is {list(got.sizes())} "
                        f"of ScalarType {got.dtype()}; the manifest's signature says {shape} {w['dtype']}. {fix}")


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


def consolidate_signature() -> dict[str, Any]:
    """``consolidate.pte``'s method (:mod:`edge_sleep.export.consolidate`): one flattened weight matrix."""
    flat = ["numel"]
    return {"forward": {
        "inputs": [_tensor("weight", flat, "float32"), _tensor("fisher", flat, "float32"),
                   _tensor("keep", flat, "float32", values="1.0 live, 0.0 pruned"), _tensor("prune", [], "int64"),
                   _tensor("strengthen_rank", [], "int64"), _tensor("scale", [], "float32", values="1 + eta")],
        "outputs": [_tensor("new_weight", flat, "float32"), _tensor("new_keep", flat, "float32"),
                    _tensor("pruned", [], "int64"), _tensor("strengthened", [], "int64")],
        "conventions": ["prunes the `prune` live weights of smallest (F w^2, |w|, index) and multiplies the kept "
                        "weights whose F w^2 exceeds the strengthen_rank-th smallest by scale (0: none)"]}}


def night_signature(record_shape: list[int], record_dtype: str, num_classes: int, noise: list[list[Any]],
                    weights: dict[str, list[int]], fisher_batch: int) -> dict[str, Any]:
    """``night.pte``'s ``replay_step`` and ``fisher_step`` (:mod:`edge_sleep.export.night`);
    ``noise`` is each noisy hidden state's shape, ``weights`` ``{name: shape}`` in order."""
    r = ["batch", *record_shape]
    inputs = [_tensor("x", r, record_dtype), _tensor("y", ["batch"], "int64"),
              _tensor("target", ["batch", num_classes], "float32"),
              _tensor("hyper", [4], "float32", values=["lr", "label_weight", "distill_weight", "noise_std"]),
              *[_tensor(f"noise {i}", s, "float32") for i, s in enumerate(noise)],
              *[_tensor(n, s, "float32") for n, s in weights.items()]]
    outputs = [_tensor("loss", [], "float32"),
               _tensor("status", [], "int64", codes={"0": "applied", "1": "non-finite loss",
                                                     "2": "non-finite gradient", "3": "non-finite weights"}),
               *[_tensor(f"new {n}", s, "float32") for n, s in weights.items()]]
    conventions = [
        "one call is one step of the night's Phase 1: replay forward with the consolidation noise, the "
        "replay loss, its gradient, the SGD update of the weights and the keep-masks",
        "noise i is standard normal noise for the i-th noisy hidden state (the app draws it); the state "
        "becomes h + noise_std * rms(h) * noise, rms over each record's features",
        "a record without stored logits passes zeros for target and a distill_weight of 0",
        "keep the weights yourself: pass them in, keep what comes out; when status != 0 do not use them: "
        "abandon the night, the weights going back to where it started",
    ]
    hyper = inputs[3]
    f = fisher_batch
    fisher_in = [_tensor("x", [f, *record_shape], record_dtype), _tensor("y", [f], "int64"),
                 _tensor("target", [f, num_classes], "float32"),
                 _tensor("valid", [f], "float32", values="1.0 a record, 0.0 a row of padding"), hyper,
                 *[_tensor(n, s, "float32") for n, s in weights.items()],
                 *[_tensor(f"sum {n}", s, "float32") for n, s in weights.items()]]
    fisher_out = [_tensor(f"new sum {n}", s, "float32") for n, s in weights.items()]
    fisher_conv = [
        "adds each record's squared gradient of its clean replay loss (no noise) to the sums; call it "
        "after the replay steps of the night's last fisher_steps steps with the weights after the step, "
        "on its first fisher_batch records; the Fisher is the sums over the number of records",
        "a batch has exactly fisher_batch rows: pad with rows of valid 0.0, which add nothing",
    ]
    return {"replay_step": {"inputs": inputs, "outputs": outputs, "conventions": conventions},
            "fisher_step": {"inputs": fisher_in, "outputs": fisher_out, "conventions": fisher_conv}}
