"""Where each learned tensor lives inside a ``.ptd``, so a night's new weights are written without an export.

A ``.ptd`` (ExecuTorch's FlatTensor file) stores every constant as raw bytes at some offset. After
a night the program is the same and only values change, so an app, the device driver or the
engine can write the new values at those offsets instead of running ``torch.export`` again.
The offsets are found when the program is exported, by exporting it once with *probe values*:
every floating-point tensor of the module is replaced by seeded random values (the program depends
on shapes and dtypes only: the export names constants by position, never by value), each probe's
bytes are then unique in the ``.ptd``, and searching for them gives every offset a tensor occupies
(a tensor two methods read can occur twice). The real ``.ptd`` is the probe ``.ptd`` with the real
values written in.

A tensor whose bytes the exporter transformed (XNNPACK's channels-last copy of a convolution's
weight, an int8-quantized weight) is not found: the layout is then ``None`` and the export folder
says so in its manifest; such programs take a new export after a night (the Python engine does
this by itself).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Layout", "module_tensors", "unread_tensors", "export_with_layout", "probe_copy", "probed", "locate", "patch", "tensor_bytes"]


@dataclass(frozen=True)
class Layout:
    """``{tensor name: (shape, dtype, [offsets])}`` of the tensors of one ``.ptd`` that a night may
    change, and the names of the module's tensors the program never reads (no ``.ptd`` holds them)."""

    tensors: dict[str, tuple[tuple[int, ...], str, list[int]]]
    unread: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"tensors": {n: {"shape": list(s), "dtype": d, "offsets": list(o)}
                            for n, (s, d, o) in self.tensors.items()},
                "unread": sorted(self.unread)}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Layout:
        return Layout({n: (tuple(v["shape"]), str(v["dtype"]), [int(o) for o in v["offsets"]])
                       for n, v in raw["tensors"].items()}, tuple(raw.get("unread", ())))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes a ``.ptd`` holds for ``t``: its values, contiguous, in native (little-endian) order."""
    return t.detach().cpu().contiguous().numpy().tobytes()


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name, non-persistent buffers included (a
    program reads those too: rotary frequencies, position ids)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def probed(t: torch.Tensor) -> bool:
    """Whether a tensor gets a probe: floating point, and of at most two dimensions (the exporter
    stores convolution weights transformed, where no probe could find them)."""
    return t.is_floating_point() and t.numel() > 0 and t.dim() <= 2


@torch.no_grad()
def probe_copy(module: nn.Module, *, exclude: frozenset[str] = frozenset(),
               seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], bool]:
    """A copy of ``module`` with every :func:`probed` parameter and buffer (but ``exclude``) set to
    seeded random values; ``{name: the real tensor}`` of those it replaced; and whether that is
    every floating-point tensor (integer buffers, such as position ids, are never learned)."""
    probe = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    real: dict[str, torch.Tensor] = {}
    complete = True
    for name, t in module_tensors(probe).items():
        if name in exclude or not t.is_floating_point() or t.numel() == 0:
            continue
        if not probed(t):
            complete = False
            continue
        real[name] = t.detach().clone()
        # values in [1, 2): no zeros, no repeats a search could confuse with padding
        t.copy_(1.0 + torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
    return probe, real, complete


def locate(data: bytes, probes: dict[str, torch.Tensor]) -> Layout | None:
    """Every offset at which each probe tensor's bytes occur in ``data``; ``None`` when one does not
    occur at all (the exporter transformed it) or two probes overlap."""
    found: dict[str, tuple[tuple[int, ...], str, list[int]]] = {}
    taken: list[tuple[int, int]] = []
    for name, t in probes.items():
        raw = tensor_bytes(t)
        offsets, at = [], data.find(raw)
        while at != -1:
            offsets.append(at)
            at = data.find(raw, at + 1)
        if not offsets:
            return None
        found[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), offsets)
        taken.extend((o, o + len(raw)) for o in offsets)
    taken.sort()
    if any(a[1] > b[0] for a, b in zip(taken, taken[1:])):
        return None
    return Layout(found)


def patch(data: bytes, layout: Layout, tensors: dict[str, torch.Tensor]) -> bytes:
    """``data`` with each tensor of ``layout`` written at its offsets (shapes and dtypes checked).

    Raises:
        ValueError: a tensor is missing, or its shape or dtype differs from the layout's.
    """
    out = bytearray(data)
    for name, (shape, dtype, offsets) in layout.tensors.items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"no value for {name!r}; the layout holds {sorted(layout.tensors)}")
        if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"{name!r} is {tuple(t.shape)} {t.dtype}; the .ptd holds {shape} {dtype}")
        raw = tensor_bytes(t)
        for o in offsets:
            out[o:o + len(raw)] = raw
    return bytes(out)


def unread_tensors(ep: torch.export.ExportedProgram) -> set[str]:
    """The names of ``ep``'s parameters, buffers and constants its graph never reads."""
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    return {names[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names and not n.users}


def export_with_layout(module: nn.Module, export: Callable[[nn.Module, set[str]], tuple[bytes, bytes]], *,
                       exclude: frozenset[str] = frozenset()) -> tuple[bytes, bytes, Layout | None]:
    """``(program, .ptd, layout)`` of ``export(module, unused)``, exported once with probe values.

    ``export`` maps a module to its ``.pte`` and its one ``.ptd``, and adds to ``unused`` the names
    of the module's tensors its graph never reads (an unused pooler: no ``.ptd`` holds them). The
    ``.ptd`` returned holds the real values; the layout is ``None`` when some learned tensor could
    not be probed. Should a probe not be found, the module is exported again as it is (correct,
    without a layout).
    """
    probe, real, complete = probe_copy(module, exclude=exclude)
    unused: set[str] = set()
    program, data = export(probe, unused)
    probes = module_tensors(probe)
    real = {n: t for n, t in real.items() if n not in unused}
    layout = locate(data, {n: probes[n] for n in real})
    if layout is None:
        program, data = export(module, set())
        return program, data, None
    layout = Layout(layout.tensors, tuple(sorted(unused)))
    return program, patch(data, layout, real), layout if complete else None
