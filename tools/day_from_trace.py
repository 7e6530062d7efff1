"""Turn a CSV trace of battery, charging and screen events into a device profile's ``[day]`` table.

Usage (from the repository root)::

    python tools/day_from_trace.py TRACE.csv [--tz ZONE] [--out FILE] [--learn-steps-per-hour 40] [--resolution-min 5]

Prints the table, or writes it to ``--out`` (atomically: a temporary file beside it, then
``os.replace``). A trace that cannot make a day prints the reason on stderr and exits 2. The
logic lives in :mod:`edge_sleep.simulate.trace`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from edge_sleep.errors import EdgeSleepError
from edge_sleep.simulate.trace import day_from_trace, day_to_toml


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = path.resolve()
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0, or 2 on a bad trace or argument)."""
    parser = argparse.ArgumentParser(
        description="Turn a CSV trace (time + battery/charging/screen columns) into a [day] table.")
    parser.add_argument("trace", type=Path, help="the CSV trace")
    parser.add_argument("--out", type=Path, help="write the table here instead of printing it")
    parser.add_argument("--tz", default=None,
                        help="the device's time zone: UTC, an offset like --tz=-08:00, or a name like America/Los_Angeles "
                             "(needed for unix seconds; converts ISO times that carry an offset)")
    parser.add_argument("--learn-steps-per-hour", type=float, default=40.0,
                        help="wake steps the app learns per hour of use (default 40)")
    parser.add_argument("--resolution-min", type=int, default=5,
                        help="slot length in minutes; divides 1440, at most 60 (default 5)")
    args = parser.parse_args(argv)
    try:
        day = day_from_trace(args.trace, learn_steps_per_usage_hour=args.learn_steps_per_hour,
                             resolution_min=args.resolution_min, tz=args.tz)
        text = day_to_toml(day)
        if args.out is None:
            sys.stdout.write(text)
        else:
            write_atomic(args.out, text)
    except (EdgeSleepError, OSError) as error:
        print(f"day_from_trace: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
