"""``consolidate.pte``: the night's Phase 2 kernel for one weight matrix, given its thresholds.

``forward(weight, fisher, keep, prune_key, strengthen_above, eta)`` on flat float32 tensors of any
length (``keep`` is 1.0 for a live weight and 0.0 for a pruned one) returns
``(new_weight, new_keep, significance)``:

    s = F * w^2
    new_keep = keep * [(s, |w|, i) > prune_key]        (lexicographic, i the flat index)
    new_w = w * (1 + eta [s > strengthen_above]) * new_keep

The prune threshold is a key ``(s, |w|, i)``: the night prunes exactly the k live weights of
smallest significance, ties broken by the smaller ``|w|`` and then the lower index
(:func:`edge_sleep.kernels.smallest_mask`), which is the set of live weights whose key is at most
the k-th smallest key. Real Fisher estimates tie a lot (on MNIST every weight of a pixel that is
always 0 has significance 0), so a threshold on ``s`` alone would prune far more than k.

What does not export is the selection itself: a k-th smallest value (``kthvalue``, and indexing by
a boolean mask) has a data-dependent shape and no ExecuTorch kernel. The caller finds the key
(``std::nth_element`` in C++, :func:`prune_key` here) and ``strengthen_above``; the program then
gives exactly the torch night's weights and mask (tested). It holds no weights and never changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from edge_sleep.errors import ExportError, InputError
from edge_sleep.export.manifest import read_manifest
from edge_sleep.kernels import significance, smallest_mask

__all__ = ["to_consolidate_program", "consolidate_reference", "prune_key", "ConsolidateProgram", "load_consolidate"]


def prune_key(score: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
              k: int) -> tuple[float, float, int]:
    """The k-th smallest key ``(s, |w|, flat index)`` among live weights; ``(-inf, 0, -1)`` if ``k <= 0``."""
    chosen = smallest_mask(score, weight, keep, k).reshape(-1)
    if not bool(chosen.any()):
        return float("-inf"), 0.0, -1
    s, mag = score.reshape(-1), weight.abs().reshape(-1)
    s_max = s[chosen].max()
    at_s = chosen & (s == s_max)
    w_max = mag[at_s].max()
    at_w = at_s & (mag == w_max)
    return float(s_max), float(w_max), int(torch.nonzero(at_w).max())


def consolidate_reference(weight: torch.Tensor, fisher: torch.Tensor, keep: torch.Tensor, prune_s: torch.Tensor,
                          prune_w: torch.Tensor, prune_i: torch.Tensor, strengthen_above: torch.Tensor,
                          eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The program's function in torch: ``(new_weight, new_keep, significance)``, ``keep`` as 0/1 floats."""
    s = significance(fisher, weight)
    mag = weight.abs()
    index = torch.arange(weight.shape[0], dtype=torch.int64)
    above = (s > prune_s) | ((s == prune_s) & ((mag > prune_w) | ((mag == prune_w) & (index > prune_i))))
    new_keep = keep * above.to(keep.dtype)
    scale = torch.where(s > strengthen_above, 1.0 + eta, torch.ones_like(eta))
    return weight * scale * new_keep, new_keep, s


class _Consolidate(nn.Module):
    def forward(self, weight: torch.Tensor, fisher: torch.Tensor, keep: torch.Tensor, prune_s: torch.Tensor,
                prune_w: torch.Tensor, prune_i: torch.Tensor, strengthen_above: torch.Tensor,
                eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return consolidate_reference(weight, fisher, keep, prune_s, prune_w, prune_i, strengthen_above, eta)


def to_consolidate_program(max_numel: int) -> bytes:
    """The ``consolidate.pte`` bytes: flat inputs of 2 to ``max_numel`` elements, scalars as 1-element tensors.

    ExecuTorch plans memory for the largest input, so ``max_numel`` should be the model's largest
    weight matrix (the program then needs about 30 bytes per element of it).
    """
    from executorch.exir import to_edge

    n = Dim("numel", min=2, max=max(9, int(max_numel)))
    # distinct tensors: one object passed twice would be traced as one input
    example = (torch.rand(8), torch.rand(8), torch.ones(8), torch.zeros(1), torch.zeros(1),
               torch.zeros(1, dtype=torch.int64), torch.ones(1), torch.zeros(1))
    shapes = ({0: n}, {0: n}, {0: n}, None, None, None, None, None)
    ep = torch.export.export(_Consolidate(), example, dynamic_shapes=shapes, strict=True)
    return bytes(to_edge(ep).to_executorch().buffer)


class ConsolidateProgram:
    """``consolidate.pte`` of an export folder, loaded through the ExecuTorch runtime.

    Call it with one weight matrix, its Fisher and bool keep-mask (any shape), the prune key
    (:func:`prune_key`), the strengthening threshold and ``eta``; it returns ``(new_weight,
    new_keep (bool), significance)`` in the weight's shape.
    """

    def __init__(self, path: Path) -> None:
        from executorch.runtime import Runtime

        try:
            self._method = Runtime.get().load_program(path).load_method("forward")
        except RuntimeError as e:
            raise ExportError(f"ExecuTorch could not load {str(path)!r} ({e}). Fix: re-export.") from e

    def __call__(self, weight: torch.Tensor, fisher: torch.Tensor, keep: torch.Tensor,
                 key: tuple[float, float, int], strengthen_above: float | torch.Tensor,
                 eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if weight.shape != fisher.shape or weight.shape != keep.shape or weight.numel() < 2:
            raise InputError(f"weight {tuple(weight.shape)}, fisher {tuple(fisher.shape)} and keep "
                             f"{tuple(keep.shape)}; expected one shape of at least 2 elements.")
        flat = [t.detach().reshape(-1).float().contiguous() for t in (weight, fisher, keep)]
        f32 = [torch.as_tensor(v, dtype=torch.float32).reshape(1) for v in (key[0], key[1])]
        rest = [torch.as_tensor(v, dtype=torch.float32).reshape(1) for v in (strengthen_above, eta)]
        index = torch.tensor([int(key[2])], dtype=torch.int64)
        new_w, new_keep, s = self._method.execute([*flat, *f32, index, *rest])
        shape = weight.shape
        return new_w.reshape(shape).to(weight.dtype), new_keep.reshape(shape).bool(), s.reshape(shape)


def load_consolidate(directory: str | Path) -> ConsolidateProgram:
    """Load ``consolidate.pte`` of an export folder after checking it against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.programs.get("consolidate")
    if files is None:
        raise ExportError(f"{str(directory)!r} has no consolidate.pte. Fix: export with consolidate=True.")
    manifest.verify(directory, [files["pte"]])
    return ConsolidateProgram(directory / files["pte"])
