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


def pytest_unconfigure(config: pytest.Config) -> None:
    """Skip the interpreter's last garbage collection over what the session leaves behind.

    The export tests leave millions of tracked objects in torch.export and ExecuTorch caches;
    the collection Python runs at exit walked them for about three minutes of CI. Frozen objects
    are ignored by every later collection (``gc.freeze``); memory is returned at exit as usual.
    """
    import gc

    gc.freeze()
