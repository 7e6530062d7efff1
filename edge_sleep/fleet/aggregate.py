"""A round's maths: is a client's update well formed, and how updates become the fleet's.

Updates are named tensors (``{name: tensor}``): a client's adapters, or the change a night made to
its base weights. The server refuses a malformed update with the reasons (so one bad client is
logged and left out, and the round goes on), then averages the rest:

- :func:`weighted_mean` is FedAvg (McMahan et al. 2017): each client weighted by its examples.
- :func:`fisher_weighted_mean` weights each client's value of each weight by that client's Fisher
  of it, the precision-weighted mean of the clients' Laplace posteriors (as in Fisher merging,
  Matena and Raffel 2022): a weight that one phone's data depends on and another's does not keeps
  the first phone's value. Where no client's Fisher says anything, it falls back to FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["check_update", "fisher_weighted_mean", "weighted_mean"]


def check_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with ``update`` against the fleet's ``reference`` tensors (empty: nothing).

    Checks, per name: present on both sides, a floating-point tensor, the reference's shape, every
    value finite. Names are reported in sorted order, each problem once.
    """
    problems = []
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"tensors the fleet's model does not have {extra}")
    for name in sorted(set(update) & set(reference)):
        value, want = update[name], reference[name]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"{name}: {kind}; expected a floating-point tensor")
        elif tuple(value.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(value.shape)}; expected {tuple(want.shape)}")
        elif not bool(torch.isfinite(value).all()):
            problems.append(f"{name}: {int((~torch.isfinite(value)).sum())} non-finite values")
    return problems


def _weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} updates; expected one weight per update")
    bad = [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"weights {bad}; expected finite numbers >= 0 (a client's example count)")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights {list(weights)} sum to 0; expected at least one client with examples")
    return [float(w) / total for w in weights]


def _same_names(updates: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    if not updates:
        raise ValueError("no updates to average; expected at least one (check_update each first)")
    names = sorted(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if sorted(u) != names:
            raise ValueError(f"update {i} names {sorted(u)}, update 0 names {names}; expected the same tensors "
                             "(check_update each against the fleet's model first)")
    return names


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: ``sum_k w_k u_k / sum_k w_k`` per tensor, with ``weights`` the clients' example counts.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 2.0])}
        >>> weighted_mean([a, b], [1, 3])["w"].tolist()
        [3.0, 2.0]
    """
    names, share = _same_names(updates), _weights(weights, len(updates))
    return {n: sum((s * u[n].double() for s, u in zip(share, updates)), torch.zeros(())).to(updates[0][n].dtype)
            for n in names}


def fisher_weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                         weights: Sequence[float], *, eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """Per weight, ``sum_k w_k F_k u_k / sum_k w_k F_k``; FedAvg where ``sum_k w_k F_k <= eps``.

    ``fishers[k]`` holds client ``k``'s diagonal Fisher of each tensor (the anchor's, non-negative,
    the shape of the tensor); ``weights`` its example count.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([4.0, 4.0])}
        >>> fa, fb = {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}
        >>> fisher_weighted_mean([a, b], [fa, fb], [1, 1])["w"].tolist()  # b's Fisher is 1/4 of the total
        [1.0, 2.0]
    """
    names, share = _same_names(updates), _weights(weights, len(updates))
    if len(fishers) != len(updates):
        raise ValueError(f"{len(fishers)} Fishers for {len(updates)} updates; expected one per update")
    for k, f in enumerate(fishers):
        problems = check_update(f, updates[k])
        negative = [n for n in names if n in f and isinstance(f[n], torch.Tensor) and bool((f[n] < 0).any())]
        if problems or negative:
            raise ValueError(f"Fisher {k}: {problems + [f'{n}: negative values' for n in negative]}; expected a "
                             "finite non-negative tensor the shape of each updated tensor")
    out = {}
    plain = weighted_mean(updates, weights)
    for n in names:
        mass = sum((s * f[n].double() for s, f in zip(share, fishers)), torch.zeros(()))
        num = sum((s * f[n].double() * u[n].double() for s, f, u in zip(share, fishers, updates)), torch.zeros(()))
        merged = torch.where(mass > eps, num / mass.clamp_min(eps), plain[n].double())
        out[n] = merged.to(updates[0][n].dtype)
    return out
