"""Measure this host on the reference workload, so a profile's relative speed scales time correctly.

    python tools/calibrate.py [--out calibration.json] [--repeats 5] [--threads N]

prints this host's CPU time on the workload (all threads of the process) and its speed against the
reference machine's wall time (``edge_sleep.simulate.calibrate.REFERENCE_SECONDS``), and writes the
JSON that ``edge-sleep simulate --calibration FILE`` reads (a fixed calibration: by default the
simulator measures its own in every process it runs). On the reference machine itself, the printed
wall seconds are the value to put in ``REFERENCE_SECONDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edge_sleep.simulate.calibrate import REFERENCE_STEPS, calibrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the calibration JSON here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error(f"--repeats={args.repeats}, --threads={args.threads}; expected integers >= 1")
    wall0 = time.perf_counter()
    cal = calibrate(repeats=args.repeats, threads=args.threads)
    wall = (time.perf_counter() - wall0) / args.repeats
    print(f"reference workload ({REFERENCE_STEPS} MLP steps, {cal.threads} threads): {cal.host_seconds:.4f} CPU s "
          f"here (about {wall:.4f} s of wall time a run, warm-up included), {cal.reference_seconds:.4f} s on the "
          f"reference machine -> host_speed {cal.host_speed:.3f}")
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(cal.to_dict(), indent=2) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
