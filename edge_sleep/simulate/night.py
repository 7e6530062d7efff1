"""One night window in a child process, under a device profile's threads and memory budget.

The simulator saves the runtime, then runs ``python -m edge_sleep.simulate.night JOB.json``.
The child uses the profile's thread count, loads the checkpoint, and sleeps until the night
completes or its budget (the window's length on the device) runs out; then it saves the checkpoint
back and writes a result JSON.

**Time is measured, in this process.** Before the night the child runs the reference workload
(:mod:`edge_sleep.simulate.calibrate`) three times at the night's thread count and times it in CPU
seconds; the night's own CPU time is scaled by that calibration to the device's seconds, and every
budget the job gives in device seconds (the window, the checkpoint interval, a kill) is counted on
that clock. After the night the workload runs once more: a host whose speed changed during the
night shows as the two calibrations disagreeing (``calibration.disagreement``). A job that carries
a fixed ``calibration`` (tests) skips the measurement and uses it.

**Memory.** A watchdog thread reads the resident set every few milliseconds: the moment the night's
memory (the resident set above the process's own once torch and edge-sleep are imported, so the
model, the store and the night's work) passes the budget, the child exits with
:data:`OVER_BUDGET_EXIT` and its result says so; the checkpoint is left as it was before the night.
The result also gives the whole process's peak (``process_peak_mb``, the kernel's high-water mark),
which the simulator compares with the budget too: that is what a platform's memory limit sees.

With ``checkpoint_every_s`` the night saves the checkpoint every that many device seconds (it stops
between chunks of steps, saves atomically, and resumes; it saves early when the next look at the clock,
one more stretch like the last, would come after the checkpoint is due), and writes ``progress`` after
each save, so a kill loses about one interval at most, and never more than one interval plus the
longest stretch between two looks at the clock (the night checks between chunks of steps;
``max_check_gap_s``); the time from each stop decision to its
saved checkpoint is measured (``stop_s``). ``kill_after_s`` kills the child without warning at the
first check after that many device seconds (:data:`KILLED_EXIT`), as a platform's low-memory
killer would.

Memory here is the CPython/PyTorch process's; on a phone the same night runs in ExecuTorch,
whose runtime is smaller than torch's but whose tensors are the same size.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["NightJob", "OVER_BUDGET_EXIT", "KILLED_EXIT", "run_job", "main"]

OVER_BUDGET_EXIT = 87
KILLED_EXIT = 88


@dataclass(frozen=True)
class NightJob:
    """What the child is asked to do.

    Attributes:
        checkpoint: the folder :meth:`EdgeSleep.save` wrote (read, then written back).
        model: ``MODULE:CALLABLE`` that builds a fresh model of the checkpoint's architecture.
        result: where the child writes its result JSON.
        threads: torch threads (the profile's cores, at most this host's).
        memory_budget_mb: the night's memory limit.
        budget_s: device seconds the window allows.
        relative_speed: the device's speed against the reference machine (the profile's).
        steps: the new night's length (ignored when resuming a preempted night).
        checkpoint_every_s: save the checkpoint every this many device seconds (``None``: once, at the end).
        kill_after_s: die without saving at the first check after this many device seconds.
        progress: where each save's ``{"saved_s", "steps"}`` (and a kill's time) is written.
        calibration: a fixed :meth:`Calibration.to_dict` to use instead of measuring one (tests).
    """

    checkpoint: str
    model: str
    result: str
    threads: int
    memory_budget_mb: float
    budget_s: float
    relative_speed: float
    steps: int | None = None
    checkpoint_every_s: float | None = None
    kill_after_s: float | None = None
    progress: str | None = None
    calibration: dict[str, Any] | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> NightJob:
        return cls(**json.loads(path.read_text()))


def _write_result(path: str, result: dict[str, Any]) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def _watchdog(job: NightJob, baseline: int, peak: list[int], stop: threading.Event) -> None:
    from edge_sleep.memory import resident_bytes

    limit = baseline + job.memory_budget_mb * 2**20
    while not stop.wait(0.005):
        rss = resident_bytes() or 0
        peak[0] = max(peak[0], rss)
        if rss > limit:
            _write_result(job.result, {"failure": "memory", "peak_mb": (rss - baseline) / 2**20,
                                       "process_peak_mb": rss / 2**20, "memory_budget_mb": job.memory_budget_mb})
            os._exit(OVER_BUDGET_EXIT)


def run_job(job: NightJob) -> dict[str, Any]:
    """Run one night window as :class:`NightJob` says (in this process); return the result."""
    import torch

    torch.set_num_threads(job.threads)
    from edge_sleep.memory import peak_resident_bytes, resident_bytes
    from edge_sleep.modelio import import_model_factory
    from edge_sleep.runtime import EdgeSleep
    from edge_sleep.simulate.calibrate import Calibration, calibrate, disagreement

    factory = import_model_factory(job.model)
    measured = job.calibration is None
    cal = Calibration.from_dict(job.calibration) if job.calibration is not None else \
        calibrate(repeats=3, threads=job.threads)
    speed = job.relative_speed

    def device_s(cpu_s: float) -> float:
        return cal.device_seconds(cpu_s, relative_speed=speed)

    baseline = resident_bytes() or 0
    peak = [baseline]
    stop = threading.Event()
    dog = threading.Thread(target=_watchdog, args=(job, baseline, peak, stop), daemon=True)
    dog.start()
    clock = time.process_time
    try:
        es = EdgeSleep.load(job.checkpoint, factory())
        wall0, t0 = time.perf_counter(), clock()
        steps, first = 0, True
        stops: list[float] = []
        checks = [t0, 0.0]  # the last check's time, and the longest stretch between two checks
        while True:
            segment0 = clock()
            asked: list[float] = []
            looked = [segment0]  # this segment's last look at the clock

            def should_stop() -> bool:
                now = clock()
                checks[1], checks[0] = max(checks[1], now - checks[0]), now
                stretch, looked[0] = now - looked[0], now
                if job.kill_after_s is not None and device_s(now - t0) >= job.kill_after_s:
                    if job.progress is not None:
                        _write_result(job.progress, {**_read(job.progress), "killed_at_s": device_s(now - t0),
                                                     "max_check_gap_s": device_s(checks[1])})
                    os._exit(KILLED_EXIT)  # no warning and nothing saved, as a platform's killer does
                # save now if the next look at the clock (one more stretch like the last) would come after the
                # checkpoint is due: a kill then loses at most the interval, not the interval plus a stretch
                done = device_s(now - t0) >= job.budget_s or (
                    job.checkpoint_every_s is not None
                    and device_s(now - segment0 + stretch) >= job.checkpoint_every_s)
                if done:
                    asked.append(now)
                return done

            report = es.sleep(steps=job.steps if first else None, should_stop=should_stop)
            first = False
            steps += report.steps
            es.save(job.checkpoint)
            if asked:
                stops.append(device_s(clock() - asked[0]))
            if job.progress is not None:
                _write_result(job.progress, {"saved_s": device_s(clock() - t0), "steps": steps})
            if report.completed or report.aborted is not None or device_s(clock() - t0) >= job.budget_s \
                    or job.checkpoint_every_s is None:
                break
        cpu_s, wall_s = clock() - t0, time.perf_counter() - wall0
        es.store.close()
    finally:
        stop.set()
        dog.join()
    hwm = max(peak[0], peak_resident_bytes() or 0)
    after = calibrate(repeats=1, threads=job.threads) if measured else cal
    return {"failure": None, "report": {**asdict(report), "steps": steps}, "device_s": device_s(cpu_s),
            "host_cpu_s": cpu_s, "host_wall_s": wall_s,
            "peak_mb": (hwm - baseline) / 2**20, "process_peak_mb": hwm / 2**20, "threads": job.threads,
            "stop_s": max(stops) if stops else None, "max_check_gap_s": device_s(checks[1]),
            "calibration": {"measured": measured, "before": cal.to_dict(), "after": after.to_dict(),
                            "disagreement": disagreement([cal, after])}}


def _read(path: str) -> dict[str, Any]:
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job = NightJob.read(Path(args[0]))
    try:
        result = run_job(job)
    except Exception as exc:  # reported to the simulator, which shows it as this night's failure
        result = {"failure": "error", "error": f"{type(exc).__name__}: {exc}"}
        _write_result(job.result, result)
        return 1
    _write_result(job.result, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
