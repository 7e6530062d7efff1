"""Chunked empirical diagonal Fisher information (pure functions).

The empirical diagonal Fisher of a per-sample loss ``l_i(w)`` is ``F = mean_i (d l_i / d w)^2``.
"Chunked" means both: over samples (micro-batches of ``chunk`` samples, so per-sample gradients
never exist for a whole batch) and over parameters (``groups`` groups of tensors computed one at a
time, so peak extra memory is one group's per-sample gradients for one chunk).

:func:`fisher_sums` uses ``torch.func`` (``vmap`` of ``grad``); :func:`fisher_sums_loop` is the
plain per-sample backward loop it is tested against, and the fallback for models ``vmap``
cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from edge_sleep.modelio import logits_of

__all__ = ["LossFn", "fisher_sums", "fisher_sums_loop", "split_groups"]

# (logits (1, C), label (1,), target logits (1, C) or None) -> scalar loss of one sample
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def split_groups(names: Sequence[str], sizes: Sequence[int], groups: int) -> list[list[str]]:
    """Split parameter ``names`` into at most ``groups`` contiguous groups of similar total size."""
    groups = max(1, min(groups, len(names)))
    total = sum(sizes)
    out: list[list[str]] = [[] for _ in range(groups)]
    acc = 0
    for name, size in zip(names, sizes):
        g = min(groups - 1, acc * groups // max(total, 1))
        out[g].append(name)
        acc += size
    return [g for g in out if g]


def fisher_sums(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    loss_fn: LossFn,
    *,
    chunk: int = 32,
    groups: int = 1,
) -> dict[str, torch.Tensor]:
    """Sums over the batch of per-sample squared gradients, for the parameters ``names``.

    Args:
        model: the model; its parameters are read, never changed.
        names: parameter names to compute the Fisher of.
        x: inputs ``(N, ...)``.
        y: labels ``(N,)``.
        target: stored logits ``(N, C)`` or ``None``.
        loss_fn: per-sample loss, see :data:`LossFn`.
        chunk: samples per micro-batch.
        groups: parameter groups computed one after another.

    Returns:
        ``{name: sum_i g_i^2}`` with each tensor shaped like its parameter; divide by ``N``.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    for group in split_groups(list(names), [params[n].numel() for n in names], groups):
        fixed = {n: p.detach() for n, p in params.items() if n not in group}

        def one_loss(trainable: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor,
                     ti: torch.Tensor | None) -> torch.Tensor:
            out = functional_call(model, ({**fixed, **trainable}, buffers), (xi.unsqueeze(0),))
            return loss_fn(logits_of(out), yi.unsqueeze(0), None if ti is None else ti.unsqueeze(0))

        trainable = {n: params[n].detach() for n in group}
        in_dims = (None, 0, 0, None if target is None else 0)
        per_sample = vmap(grad(one_loss), in_dims=in_dims, randomness="different")
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            g = per_sample(trainable, x[sl], y[sl], None if target is None else target[sl])
            for n in group:
                sums[n] += g[n].pow(2).sum(dim=0)  # (chunk, *shape) -> shape
    return sums


def fisher_sums_loop(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """Reference: the same sums with one ``backward`` per sample."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    chosen = [params[n] for n in names]
    for i in range(x.shape[0]):
        out = logits_of(model(x[i : i + 1]))
        loss = loss_fn(out, y[i : i + 1], None if target is None else target[i : i + 1])
        grads = torch.autograd.grad(loss, chosen, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sums[n] += g.detach().pow(2)
    return sums
