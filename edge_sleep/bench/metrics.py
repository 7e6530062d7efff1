"""Continual-learning metrics over an accuracy matrix (pure functions).

``acc[i, j]`` is the accuracy on task ``j`` after training on task ``i`` (rows: training stage,
columns: evaluated task), for ``T`` tasks.

Example:
    >>> import numpy as np
    >>> acc = np.array([[0.9, 0.1], [0.7, 0.8]])
    >>> round(average_accuracy(acc), 3), round(backward_transfer(acc), 3), round(forgetting(acc), 3)
    (0.75, -0.2, 0.2)
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_accuracy", "backward_transfer", "forgetting"]


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
