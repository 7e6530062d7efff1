from __future__ import annotations

import numpy as np

from edge_sleep.bench.metrics import average_accuracy, backward_transfer, forgetting


def test_metrics_on_a_hand_computed_matrix() -> None:
    acc = np.array([[0.9, np.nan, np.nan], [0.8, 0.95, np.nan], [0.6, 0.9, 0.97]])
    assert np.isclose(average_accuracy(acc), (0.6 + 0.9 + 0.97) / 3)
    assert np.isclose(backward_transfer(acc), ((0.6 - 0.9) + (0.9 - 0.95)) / 2)
    assert np.isclose(forgetting(acc), ((0.9 - 0.6) + (0.95 - 0.9)) / 2)


def test_single_task_has_no_forgetting() -> None:
    acc = np.array([[0.5]])
    assert backward_transfer(acc) == 0.0 and forgetting(acc) == 0.0
