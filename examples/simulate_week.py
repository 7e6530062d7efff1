"""Simulate a week of a phone: learning while it is used, sleeping while it charges.

    python examples/simulate_week.py [--profile galaxy-s24] [--days 7] [--out DIR] [--quick]

Runs the real wake and sleep code on a virtual clock through a week of the device profile
(``device_profiles/<profile>.toml``): each day is drawn from its typical day and ``[variation]``
(sessions move, an overnight charge is missed, a daytime top-up happens), and the platform's rules
apply (the OS caps, delays, skips and kills background work; the night checkpoints every minute).
Each day brings a new Permuted-MNIST task, learned in the usage windows through LoRA adapters; each
charging window runs a night in a child process under the profile's memory budget. Prints each
day's accuracy, forgetting, replay steps, energy and peak memory, and what the platform did, and
writes ``report.json`` and ``timeline.png`` to ``--out``.

``--quick`` simulates one typical day with small tasks and counts this host as fast as the
reference machine instead of measuring it (what the tests run). A full week takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from edge_sleep.simulate.calibrate import Calibration
from edge_sleep.simulate.day import SimulationConfig, simulate
from edge_sleep.simulate.profiles import load_profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="galaxy-s24", help="a name in device_profiles/ or a TOML path")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="where report.json and timeline.png go")
    parser.add_argument("--quick", action="store_true", help="one small day, no calibration (what the tests run)")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    out = args.out or Path(tempfile.mkdtemp(prefix="edge-sleep-week-"))
    if args.quick:
        config = SimulationConfig(days=1, train_per_task=2048, test_per_task=200, batch=32, tick_s=600.0)
        threads = max(1, min(profile.cores, os.cpu_count() or 1))  # the night's threads, as simulate picks them
        calibration: Calibration | None = Calibration(host_seconds=1.0, reference_seconds=1.0, threads=threads)
    else:
        # calibration None: measure this host's CPU time in every process
        config = SimulationConfig(days=args.days, platform=True, days_from="drawn")
        calibration = None
    report = simulate(profile, out, config, calibration=calibration, progress=not args.quick)

    print(f"{report['profile_name']}, {len(report['days'])} day(s), memory budget {report['memory_budget_mb']:.0f} MB")
    print(f"{'day':>4} {'accuracy':>9} {'forgetting':>10} {'replay steps':>12} {'night J':>8} {'battery':>8} {'peak MB':>8}")
    for d in report["days"]:
        battery = "mains" if d["battery_share"] is None else f"{d['battery_share']:.3%}"
        peak = "-" if d["peak_memory_mb"] is None else f"{d['peak_memory_mb']:.0f}"
        forgetting = "-" if d["forgetting"] is None else f"{d['forgetting']:.3f}"
        print(f"{d['day']:>4} {d['accuracy']:>9.3f} {forgetting:>10} {d['night_steps']:>12} {d['energy_j']:>8.1f} "
              f"{battery:>8} {peak:>8}")
    plat = report["platform"]
    if plat["rules"]:
        print(f"the platform: {plat['kills']} kill(s) (at most {plat['max_lost_s']:.0f} s of work lost), "
              f"{plat['interruptions']} interruption(s), {plat['skipped_nights']} skipped night(s), "
              f"{plat['capped_runs']} run(s) stopped at the OS's cap; {report['missed_nights']} day(s) without a night")
    print(f"wrote {out / 'report.json'} and {out / 'timeline.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
