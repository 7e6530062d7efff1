"""Continual-learning metrics over an accuracy matrix (pure functions).

``acc[i, j]`` is the accuracy on task ``j`` after training on task ``i`` (rows: training stage,
columns: evaluated task), for ``T`` tasks.

Example:
    >>> import numpy as np
    >>> acc = np.array([[0.9, 0.1], [0.7, 0.8]])
    >>> round(average_accuracy(acc), 3), round(backward_transfer(acc), 3), round(forgetting(acc), 3)
    (0.75, -0.2, 0.2)
    >>> round(plasticity(acc), 3)
    0.85
    >>> paired_differences([0.91, 0.90, 0.92], [0.89, 0.89, 0.90])
    {'diffs': [0.02, 0.01, 0.02], 'mean': 0.016667, 'std': 0.005774}
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "plasticity", "sample_std", "paired_differences"]


def average_accuracy(acc: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last one: ``mean_j acc[T-1, j]``."""
    return float(np.mean(acc[-1]))


def backward_transfer(acc: np.ndarray) -> float:
    """``mean_{j<T-1} (acc[T-1, j] - acc[j, j])`` (Lopez-Paz & Ranzato 2017); negative = forgetting."""
    t = acc.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([acc[-1, j] - acc[j, j] for j in range(t - 1)]))


def forgetting(acc: np.ndarray) -> float:
    """``mean_{j<T-1} (max_{i<T-1} acc[i, j] - acc[T-1, j])`` (Chaudhry et al. 2018)."""
    t = acc.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([acc[j:t - 1, j].max() - acc[-1, j] for j in range(t - 1)]))


def plasticity(acc: np.ndarray) -> float:
    """The diagonal's mean, ``mean_j acc[j, j]``: accuracy on each task just after learning it."""
    return float(np.mean(np.diag(acc)))


def sample_std(values: list[float]) -> float:
    """The sample standard deviation (``ddof=1``); ``0.0`` for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def paired_differences(a: list[float], b: list[float]) -> dict[str, float | list[float]]:
    """Per-seed differences ``a[i] - b[i]`` of two rows run on the same seeds, their mean and
    sample standard deviation (rounded to 6 decimals)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows need the same seeds; got {len(a)} and {len(b)} values")
    diffs = [round(x - y, 6) for x, y in zip(a, b)]
    return {"diffs": diffs, "mean": round(float(np.mean(diffs)), 6), "std": round(sample_std(diffs), 6)}
