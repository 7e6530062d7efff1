"""Chunked empirical diagonal Fisher information (pure functions).

The empirical diagonal Fisher of a per-sample loss ``l_i(w)`` is ``F = mean_i (d l_i / d w)^2``.
"Chunked" means both: over samples (micro-batches of ``chunk`` samples, so per-sample gradients
never exist for a whole batch) and over parameters (``groups`` groups of tensors computed one at a
time, so peak extra memory is one group's per-sample gradients for one chunk).

:func:`fisher_sums` uses ``torch.func`` (``vmap`` of ``grad``); :func:`fisher_sums_loop` is the
plain per-sample backward loop it is tested against, and the fallback for models ``vmap``
cannot trace. :func:`fisher_sums_streamed` is the bounded-memory form: one sample at a time, and
each parameter's gradient squared into its sum the moment backward produces it and then freed, so
at most one tensor's gradient and one sample's activations exist at once, whatever the model's
size, at the cost of a forward and a backward per sample (as the loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from edge_sleep.memory import release_free_memory
from edge_sleep.modelio import logits_of

__all__ = ["LossFn", "Piece", "FisherPlan", "fisher_sums", "fisher_sums_loop", "fisher_sums_streamed",
           "plan_fisher", "split_groups"]

# (logits (1, C), label (1,), target logits (1, C) or None) -> scalar loss of one sample
LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


Piece = tuple[str, int, int]  # (parameter name, first row, row after the last) along dim 0


def split_groups(names: Sequence[str], shapes: Sequence[Sequence[int]], groups: int) -> list[list[Piece]]:
    """Split parameters into at most ``groups`` groups of near-equal element counts.

    A tensor may be cut along its first dimension, so a group holds at most
    ``total / groups`` elements plus or minus one row: the MLP 784-100-100-10's 89,610 weights in two
    groups are 44,688 + 44,922, not 78,400 + 11,210.

    Args:
        names: parameter names, in order.
        shapes: their shapes.
        groups: the number of groups wanted.

    Returns:
        Groups of pieces ``(name, start_row, stop_row)``; a 0-d tensor is the piece ``(name, 0, 1)``.

    Example:
        >>> split_groups(["w", "b"], [(4, 3), (4,)], 2)
        [[('w', 0, 3)], [('w', 3, 4), ('b', 0, 4)]]
    """
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    groups = max(1, int(groups))
    out: list[list[Piece]] = [[]]
    done = 0  # elements placed so far; group g ends near (g + 1) * total / groups

    def boundary() -> float:
        return len(out) * total / groups

    for name, shape, numel in zip(names, shapes, sizes):
        rows = int(shape[0]) if len(shape) else 1
        row = numel // rows if rows else 0
        if row == 0:  # an empty tensor: one piece, no elements
            out[-1].append((name, 0, rows))
            continue
        start = 0
        while start < rows:
            if len(out) == groups:
                take = rows - start
            else:
                take = min(rows - start, round((boundary() - done) / row))
                if take <= 0:
                    if out[-1]:
                        out.append([])
                        continue
                    take = 1
            out[-1].append((name, start, start + take))
            done += take * row
            start += take
            if len(out) < groups and done >= boundary() - row / 2:
                out.append([])
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

    Per-sample gradients exist for one group of parameters (:func:`split_groups`, rows of a
    tensor at a time) and one micro-batch of ``chunk`` samples at a time.

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
    for group in split_groups(list(names), [tuple(params[n].shape) for n in names], groups):
        in_group = {n for n, _, _ in group}
        fixed = {n: p.detach() for n, p in params.items() if n not in in_group}
        pieces = {n: (a, b) for n, a, b in group}

        def assemble(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            full = {}
            for n, (a, b) in pieces.items():
                p = params[n].detach()
                if p.ndim == 0 or (a == 0 and b == p.shape[0]):
                    full[n] = trainable[n]
                else:  # rows [a, b) trainable, the rest fixed: gradients exist for the slice only
                    full[n] = torch.cat([p[:a], trainable[n], p[b:]], dim=0)
            return full

        def one_loss(trainable: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor,
                     ti: torch.Tensor | None) -> torch.Tensor:
            out = functional_call(model, ({**fixed, **assemble(trainable)}, buffers), (xi.unsqueeze(0),))
            return loss_fn(logits_of(out), yi.unsqueeze(0), None if ti is None else ti.unsqueeze(0))

        trainable = {n: params[n].detach() if params[n].ndim == 0 else params[n].detach()[a:b]
                     for n, (a, b) in pieces.items()}
        in_dims = (None, 0, 0, None if target is None else 0)
        per_sample = vmap(grad(one_loss), in_dims=in_dims, randomness="different")
        for start in range(0, x.shape[0], chunk):
            sl = slice(start, start + chunk)
            g = per_sample(trainable, x[sl], y[sl], None if target is None else target[sl])
            for n, (a, b) in pieces.items():
                sq = g[n].pow(2).sum(dim=0)  # (chunk, *piece shape) -> piece shape
                if sums[n].ndim == 0:
                    sums[n] += sq
                else:
                    sums[n][a:b] += sq
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


def fisher_sums_streamed(
    model: nn.Module,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    loss_fn: LossFn,
    sums: dict[str, torch.Tensor] | None = None,
    *,
    release_memory: bool = True,
) -> dict[str, torch.Tensor]:
    """The same sums as :func:`fisher_sums`, in bounded memory: one sample and one tensor at a time.

    Each sample runs one forward and one backward. A hook on every chosen parameter
    (``register_post_accumulate_grad_hook``) adds the gradient's square into the parameter's sum
    as soon as backward has it and drops the gradient, so the extra memory is one sample's
    activations plus the largest single gradient, not the model's size. Parameters not in
    ``names`` get no gradient during the call; every parameter's ``requires_grad`` and ``.grad``
    are as before afterwards. ``model``, ``names``, ``x``, ``y``, ``target`` and ``loss_fn`` are as
    in :func:`fisher_sums`.

    Args:
        sums: accumulate into these tensors (shaped like the parameters, float32) instead of new
            zeros, so a caller can keep one buffer for a whole night.
        release_memory: after each gradient, return the C heap's free pages to the operating
            system (:func:`edge_sleep.memory.release_free_memory`), so that what backward freed
            (the activations behind it) does not stay resident beside the next gradient. On CPU
            this keeps the resident peak near the bound instead of creeping up sample after
            sample, at a cost in time (pages fault in again; ``benchmarks/fisher_memory.py``
            measures both).

    Returns:
        ``{name: sum_i g_i^2}``; divide by ``N``.
    """
    params = dict(model.named_parameters())
    chosen = set(names)
    if sums is None:
        sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    hooks = []

    def square_into(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None
            if g is not None:
                sums[name].addcmul_(g, g)
            del g  # freed now, so that the release below returns its pages too
            if release_memory:
                release_free_memory()

        return hook

    try:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(n in chosen)
            if n in chosen:
                hooks.append(p.register_post_accumulate_grad_hook(square_into(n)))
        for i in range(x.shape[0]):
            out = logits_of(model(x[i : i + 1]))
            loss = loss_fn(out, y[i : i + 1], None if target is None else target[i : i + 1])
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    return sums


@dataclass(frozen=True)
class FisherPlan:
    """How a night computes its per-sample gradients, and the extra memory that is expected to take.

    ``method`` is ``"vmap"`` (:func:`fisher_sums`: ``chunk`` samples at once, ``groups`` groups of
    parameters one after another) or ``"streamed"`` (:func:`fisher_sums_streamed`: one sample and
    one tensor at a time). ``planned_bytes`` excludes the model-sized accumulator of the sums,
    which every method fills.
    """

    method: str
    chunk: int
    groups: int
    planned_bytes: int

    def describe(self) -> str:
        if self.method == "streamed":
            return "streamed: one sample, one tensor's gradient at a time"
        return f"vmap: {self.chunk} samples at once, {self.groups} parameter group(s)"


def plan_fisher(param_bytes: Sequence[int], activation_bytes: int, *, chunk: int, groups: int,
                budget_bytes: int | None) -> FisherPlan:
    """Choose how to compute the Fisher within ``budget_bytes`` of extra memory (pure).

    The configured ``vmap`` plan holds ``chunk`` samples' gradients of one parameter group (about
    ``total / groups``), their squares and ``chunk`` samples' activations; the streamed plan holds
    the largest single gradient and one sample's activations. Without a budget the configured plan
    is used; with one, the configured plan if it fits, else the streamed one (the least memory any
    per-sample Fisher can take here).

    Raises:
        ValueError: not even the streamed plan fits the budget (the message says what it needs).

    Example:
        >>> plan_fisher([400, 100], 50, chunk=8, groups=1, budget_bytes=None).method
        'vmap'
        >>> plan_fisher([400, 100], 50, chunk=8, groups=1, budget_bytes=1000).describe()
        "streamed: one sample, one tensor's gradient at a time"
    """
    total = sum(param_bytes)
    per_group = math.ceil(total / max(1, groups))
    vmap_bytes = 2 * chunk * per_group + chunk * activation_bytes
    configured = FisherPlan("vmap", chunk, groups, vmap_bytes)
    if budget_bytes is None or vmap_bytes <= budget_bytes:
        return configured
    streamed = FisherPlan("streamed", 1, len(param_bytes), max(param_bytes, default=0) + activation_bytes)
    if streamed.planned_bytes <= budget_bytes:
        return streamed
    raise ValueError(f"a memory budget of {budget_bytes / 2**20:.1f} MB is below the least a per-sample "
                     f"Fisher needs here, {streamed.planned_bytes / 2**20:.1f} MB (the largest gradient, "
                     f"{max(param_bytes, default=0) / 2**20:.1f} MB, plus one sample's activations, "
                     f"{activation_bytes / 2**20:.1f} MB)")
