"""``consolidate.pte``: the night's whole Phase 2 for one weight matrix, exact selection included.

``forward(weight, fisher, keep, prune, strengthen_rank, scale)`` on flat float32 tensors of any
length (``keep`` is 1.0 for a live weight and 0.0 for a pruned one; ``prune`` and
``strengthen_rank`` int64 scalars, ``scale`` the float32 ``1 + eta``) returns
``(new_weight, new_keep, pruned, strengthened)``, the same as the torch night
(:func:`edge_sleep.kernels.consolidate_`, tested bit for bit): the ``prune`` live weights of
smallest key ``(s, |w|, index)``, ``s = F * w^2``, are pruned (exactly that many, whatever the
ties: real Fisher estimates tie a lot, every weight of an MNIST pixel that is always 0 has
``s = 0``), and the kept weights whose ``s`` exceeds the ``strengthen_rank``-th smallest are
multiplied by ``scale``.

The k-th smallest key is found in the program by radix selection (:func:`edge_sleep.kernels.
radix_select`): histograms of 16-bit digits by ``scatter_add``, a ``cumsum``, compares; fixed
shapes, linear, no sort. ExecuTorch cannot reinterpret a float's bits, so the keys are rebuilt
arithmetically (:func:`edge_sleep.kernels.order_key_nonneg`, exact for every non-negative
float32; a Fisher is never negative). The program runs on ExecuTorch's portable kernels, holds no
weights and never changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from edge_sleep.errors import ExportError, InputError
from edge_sleep.export.identity import EXPORT_ID_METHOD, check_id_value, new_export_id
from edge_sleep.export.release import releases_export_state
from edge_sleep.export.manifest import read_manifest
from edge_sleep.export.runner import open_program
from edge_sleep.kernels import consolidate_radix, order_key_nonneg

__all__ = ["to_consolidate_program", "ConsolidateProgram", "load_consolidate"]


class _Consolidate(nn.Module):
    def forward(self, weight: torch.Tensor, fisher: torch.Tensor, keep: torch.Tensor, prune: torch.Tensor,
                strengthen_rank: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        new_w, new_keep, pruned, strong = consolidate_radix(weight, fisher, keep > 0.5, prune, strengthen_rank,
                                                            scale, key_of=order_key_nonneg)
        return new_w, new_keep.to(weight.dtype), pruned, strong


@releases_export_state
def to_consolidate_program(max_numel: int, export_id: str | None = None) -> bytes:
    """The ``consolidate.pte`` bytes: flat inputs of 2 to ``max_numel`` elements, scalars as 0-d tensors,
    and the constant method ``export_id`` (default: a new id; :mod:`edge_sleep.export.identity`).

    ExecuTorch plans memory for the largest input, so ``max_numel`` should be the model's largest
    weight matrix (the program then needs about 100 bytes per element of it: the portable kernels
    materialize every intermediate).
    """
    from executorch.exir import to_edge

    n = Dim("numel", min=2, max=max(9, int(max_numel)))
    # distinct tensors: one object passed twice would be traced as one input
    example = (torch.randn(8), torch.rand(8), torch.ones(8), torch.tensor(2), torch.tensor(6), torch.tensor(1.1))
    shapes = ({0: n}, {0: n}, {0: n}, None, None, None)
    ep = torch.export.export(_Consolidate(), example, dynamic_shapes=shapes, strict=True)
    export_id = new_export_id() if export_id is None else check_id_value(export_id)
    return bytes(to_edge(ep, constant_methods={EXPORT_ID_METHOD: export_id}).to_executorch().buffer)


class ConsolidateProgram:
    """``consolidate.pte`` of an export folder, loaded through the ExecuTorch runtime.

    Call it with one weight matrix, its Fisher and bool keep-mask (any shape, at least 2
    elements), how many live weights to prune, the rank of the strengthening threshold (``None``:
    no strengthening) and ``eta``; it returns ``(new_weight, new_keep (bool), pruned,
    strengthened)`` in the weight's shape, the same as :func:`edge_sleep.kernels.consolidate_`.
    """

    def __init__(self, program: Any, path: Path) -> None:
        try:
            self._method = program.load_method("forward")
        except RuntimeError as e:
            raise ExportError(f"ExecuTorch could not load {str(path)!r} ({e}). Fix: re-export.") from e

    def __call__(self, weight: torch.Tensor, fisher: torch.Tensor, keep: torch.Tensor, *, prune: int,
                 strengthen_rank: int | None, eta: float) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if weight.shape != fisher.shape or weight.shape != keep.shape or weight.numel() < 2:
            raise InputError(f"weight {tuple(weight.shape)}, fisher {tuple(fisher.shape)} and keep "
                             f"{tuple(keep.shape)}; expected one shape of at least 2 elements.")
        if bool((fisher < 0).any()) or not bool(torch.isfinite(fisher).all() and torch.isfinite(weight).all()):
            raise InputError("the Fisher must be finite and >= 0 and the weights finite "
                             "(consolidate.pte orders significances by their bits, which needs F >= 0)")
        flat = [t.detach().reshape(-1).float().contiguous() for t in (weight, fisher, keep)]
        live = int(keep.sum())
        rank = 0 if strengthen_rank is None or eta == 0 else min(max(int(strengthen_rank), 1), weight.numel())
        scalars = [torch.tensor(min(max(int(prune), 0), live)), torch.tensor(rank),
                   torch.tensor(1.0 + eta, dtype=torch.float64).float()]
        new_w, new_keep, pruned, strong = self._method.execute([*flat, *scalars])
        shape = weight.shape
        return new_w.reshape(shape).to(weight.dtype), new_keep.reshape(shape).bool(), int(pruned), int(strong)


def load_consolidate(directory: str | Path) -> ConsolidateProgram:
    """Load ``consolidate.pte`` of an export folder after checking it against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.programs.get("consolidate")
    if files is None:
        raise ExportError(f"{str(directory)!r} has no consolidate.pte. Fix: export with consolidate=True.")
    return ConsolidateProgram(open_program(directory, manifest, "consolidate"), directory / files["pte"])
