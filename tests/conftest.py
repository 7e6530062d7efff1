from __future__ import annotations

import torch
from torch import nn
import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_mlp(d_in: int = 8, hidden: int = 16, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))
