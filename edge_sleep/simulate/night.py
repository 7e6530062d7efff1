"""One night window in a child process, under a device profile's threads and memory budget.

The simulator saves the runtime, then runs ``python -m edge_sleep.simulate.night JOB.json``.
The child uses the profile's thread count, loads the checkpoint, and sleeps until the night
completes or its host-time budget (the window's length on the device, scaled to this host) runs
out; then it saves the checkpoint back and writes a result JSON. A watchdog thread reads the
resident set every few milliseconds: the moment the night's memory (the resident set above the
process's own once torch and edge-sleep are imported, so the model, the store and the night's
work) passes the budget, the child exits with :data:`OVER_BUDGET_EXIT` and its result says so;
the checkpoint is left as it was before the night.

With ``checkpoint_every_host_s`` the night saves the checkpoint every that many host seconds (it
stops between chunks of steps, saves atomically, and resumes), and writes ``progress`` after each
save, so a kill loses at most one interval plus the longest stretch between two looks at the clock
(the night checks between chunks of steps; ``max_check_gap_s``); the time from each stop decision to
its saved checkpoint is measured (``stop_s``). ``kill_after_host_s`` kills the child without warning at the
first check after that time (:data:`KILLED_EXIT`), as a platform's low-memory killer would.

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
        host_budget_s: host seconds the window allows.
        steps: the new night's length (ignored when resuming a preempted night).
        checkpoint_every_host_s: save the checkpoint every this many host seconds (``None``: once, at the end).
        kill_after_host_s: die without saving at the first check after this many host seconds.
        progress: where each save's ``{"saved_host_s", "steps"}`` (and a kill's time) is written.
    """

    checkpoint: str
    model: str
    result: str
    threads: int
    memory_budget_mb: float
    host_budget_s: float
    steps: int | None = None
    checkpoint_every_host_s: float | None = None
    kill_after_host_s: float | None = None
    progress: str | None = None

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
                                       "memory_budget_mb": job.memory_budget_mb})
            os._exit(OVER_BUDGET_EXIT)


def run_job(job: NightJob) -> dict[str, Any]:
    """Run one night window as :class:`NightJob` says (in this process); return the result."""
    import torch

    torch.set_num_threads(job.threads)
    from edge_sleep.memory import peak_resident_bytes, resident_bytes
    from edge_sleep.modelio import import_model_factory
    from edge_sleep.runtime import EdgeSleep

    factory = import_model_factory(job.model)
    baseline = resident_bytes() or 0
    peak = [baseline]
    stop = threading.Event()
    dog = threading.Thread(target=_watchdog, args=(job, baseline, peak, stop), daemon=True)
    dog.start()
    try:
        es = EdgeSleep.load(job.checkpoint, factory())
        t0 = time.perf_counter()
        steps, first = 0, True
        stops: list[float] = []
        checks = [t0, 0.0]  # the last check's time, and the longest stretch between two checks
        while True:
            segment0 = time.perf_counter()
            asked: list[float] = []

            def should_stop() -> bool:
                now = time.perf_counter()
                checks[1], checks[0] = max(checks[1], now - checks[0]), now
                if job.kill_after_host_s is not None and now - t0 >= job.kill_after_host_s:
                    if job.progress is not None:
                        _write_result(job.progress, {**_read(job.progress), "killed_at_host_s": now - t0,
                                                     "max_check_gap_host_s": checks[1]})
                    os._exit(KILLED_EXIT)  # no warning and nothing saved, as a platform's killer does
                done = now - t0 >= job.host_budget_s or (
                    job.checkpoint_every_host_s is not None and now - segment0 >= job.checkpoint_every_host_s)
                if done:
                    asked.append(now)
                return done

            report = es.sleep(steps=job.steps if first else None, should_stop=should_stop)
            first = False
            steps += report.steps
            es.save(job.checkpoint)
            if asked:
                stops.append(time.perf_counter() - asked[0])
            if job.progress is not None:
                _write_result(job.progress, {"saved_host_s": time.perf_counter() - t0, "steps": steps})
            if report.completed or report.aborted is not None or time.perf_counter() - t0 >= job.host_budget_s \
                    or job.checkpoint_every_host_s is None:
                break
        host_s = time.perf_counter() - t0
        es.store.close()
    finally:
        stop.set()
        dog.join()
    hwm = peak_resident_bytes() or peak[0]
    return {"failure": None, "report": {**asdict(report), "steps": steps}, "host_s": host_s,
            "peak_mb": (max(peak[0], hwm) - baseline) / 2**20, "threads": job.threads,
            "stop_s": max(stops) if stops else None, "max_check_gap_s": checks[1]}


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
