"""The reference workload: how fast this host is, so a profile's relative speed scales time.

A profile's ``relative_speed`` is its throughput on :func:`reference_workload` divided by the
reference machine's (a 2-vCPU AMD EPYC cloud VM, where :data:`REFERENCE_SECONDS` was measured by
``python tools/calibrate.py``). On any host, :func:`calibrate` measures the same workload; the
simulator turns measured host seconds into device seconds with
``device_s = host_s * host_speed / profile.relative_speed``.

The workload is what a night does: forward, backward and an SGD step of the P-MNIST MLP
(784-100-100-10) on batches of 128, with every thread the simulator gives the night.

Example:
    >>> c = Calibration(host_seconds=0.5, reference_seconds=0.25)
    >>> c.host_speed, c.device_seconds(10.0, relative_speed=2.0)
    (0.5, 2.5)
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["REFERENCE_SECONDS", "REFERENCE_STEPS", "Calibration", "calibrate", "reference_workload"]

REFERENCE_STEPS = 200
# the median of 7 runs of reference_workload() on the reference machine (2-vCPU AMD EPYC, 2 threads;
# runs there spread 0.23-0.27 s), measured with `python tools/calibrate.py --repeats 7` (2026-11-27)
REFERENCE_SECONDS = 0.23


def reference_workload(steps: int = REFERENCE_STEPS, seed: int = 0) -> float:
    """Seconds for ``steps`` SGD steps of the P-MNIST MLP on random batches of 128 (after a warm-up)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(128, 784, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Calibration:
    """This host against the reference machine.

    Attributes:
        host_seconds: the workload's median time here.
        reference_seconds: its time on the reference machine.
        threads: torch threads used.
    """

    host_seconds: float
    reference_seconds: float = REFERENCE_SECONDS
    threads: int = 0

    @property
    def host_speed(self) -> float:
        """This host's throughput relative to the reference machine (> 1: faster)."""
        return self.reference_seconds / self.host_seconds

    def device_seconds(self, host_s: float, *, relative_speed: float) -> float:
        """Seconds the same work takes on a device of ``relative_speed``."""
        return host_s * self.host_speed / relative_speed

    def host_budget(self, device_s: float, *, relative_speed: float) -> float:
        """Host seconds that stand for ``device_s`` seconds on that device."""
        return device_s * relative_speed / self.host_speed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "host_speed": self.host_speed}


def calibrate(*, repeats: int = 5, threads: int | None = None) -> Calibration:
    """Measure the reference workload on this host (median of ``repeats`` runs).

    Args:
        repeats: runs; the median is kept.
        threads: torch threads; default all of this host's cores.
    """
    threads = threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = [reference_workload() for _ in range(repeats)]
    finally:
        torch.set_num_threads(before)
    return Calibration(host_seconds=statistics.median(times), threads=threads)
