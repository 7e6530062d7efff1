"""The reference workload: how fast this host is, so a profile's relative speed scales time.

A profile's ``relative_speed`` is its throughput on :func:`reference_workload` divided by the
reference machine's (a 2-vCPU AMD EPYC cloud VM, where :data:`REFERENCE_SECONDS` was measured by
``python tools/calibrate.py``). On any host, :func:`calibrate` measures the same workload; the
simulator turns measured host seconds into device seconds with
``device_s = host_s * host_speed / profile.relative_speed``.

Host time is **CPU time** of the process (:func:`time.process_time`, all its threads), not wall
time: another program that keeps the host busy takes the CPU away from the night without adding
to the night's CPU time, so a busy host scales the same work to the same device seconds. The
night's CPU seconds divided by the workload's CPU seconds here, measured in the same process at
the same thread count, is the night's work in workloads, whatever the thread count; one workload
takes :data:`REFERENCE_SECONDS` of wall time on the reference machine and ``1 / relative_speed``
of that on the device. The simulator measures the workload in its own process (for the wake
steps) and around each night in the night's child process (:mod:`edge_sleep.simulate.night`).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edge_sleep.errors import ConfigError

__all__ = ["CLOCK", "DISAGREEMENT", "REFERENCE_SECONDS", "REFERENCE_STEPS", "Calibration", "calibrate", "disagreement",
           "reference_workload"]

REFERENCE_STEPS = 200
# wall seconds: the median of 7 runs of reference_workload() on the reference machine (2-vCPU AMD EPYC, 2
# threads; runs there spread 0.23-0.27 s), measured in wall time on 2026-11-27. It is what one workload takes
# on that machine, the unit a profile's relative_speed is measured against; host time is CPU time (above).
REFERENCE_SECONDS = 0.23
CLOCK = "cpu"
DISAGREEMENT = 0.20  # calibrations further apart than this (max / min - 1) are warned about


def reference_workload(steps: int = REFERENCE_STEPS, seed: int = 0) -> float:
    """CPU seconds of this process for ``steps`` SGD steps of the P-MNIST MLP on random batches of 128 (after a warm-up)."""
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
    t0 = time.process_time()
    for _ in range(steps):
        step()
    return time.process_time() - t0


@dataclass(frozen=True)
class Calibration:
    """This host against the reference machine.

    Attributes:
        host_seconds: the workload's median CPU time here (all threads of the process).
        reference_seconds: its wall time on the reference machine.
        threads: torch threads used.
        runs: every run's CPU seconds (empty when the calibration was given, not measured).
    """

    host_seconds: float
    reference_seconds: float = REFERENCE_SECONDS
    threads: int = 0
    runs: tuple[float, ...] = ()

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
        return {**asdict(self), "runs": list(self.runs), "host_speed": self.host_speed, "clock": CLOCK}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        """What :meth:`to_dict` (or ``tools/calibrate.py``) wrote.

        Raises:
            ConfigError: a file from before CPU time (no ``"clock": "cpu"``), or a bad value.
        """
        if raw.get("clock") != CLOCK:
            raise ConfigError("calibration", [
                f"clock={raw.get('clock')!r}; expected {CLOCK!r}: the file was measured in wall time, which a busy "
                "host inflates. Fix: measure again with python tools/calibrate.py"])
        host, ref = raw["host_seconds"], raw["reference_seconds"]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (host, ref)):
            raise ConfigError("calibration", [f"host_seconds={host!r}, reference_seconds={ref!r}; expected positive "
                                              "seconds. Fix: measure again with python tools/calibrate.py"])
        return cls(host_seconds=float(host), reference_seconds=float(ref), threads=int(raw.get("threads", 0)),
                   runs=tuple(float(x) for x in raw.get("runs", ())))


def disagreement(calibrations: list[Calibration]) -> float:
    """How far apart measured calibrations are: ``max / min - 1`` of their host seconds (0 for fewer than 2)."""
    seconds = [c.host_seconds for c in calibrations]
    return max(seconds) / min(seconds) - 1.0 if len(seconds) > 1 else 0.0


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
    return Calibration(host_seconds=statistics.median(times), threads=threads, runs=tuple(times))
