"""Every bundled device profile, 3 simulated days, the fixed 1:1 policy against the adaptive one.

    python benchmarks/simulate.py [--days 3] [--seeds 0 1 2] [--profiles galaxy-s24 ...]

For each profile, policy and seed it runs ``edge_sleep.simulate.day.simulate`` (the real wake and
sleep code on the profile's day; nights in a child process under the profile's threads and
memory budget) and writes ``benchmarks/results/simulate.json``: every run's per-day report, and
per profile and policy the mean and spread over seeds of the final accuracy, forgetting, replay
steps, energy per night and battery share, the peak memory against the budget, and each run's
wall time against the 10-minute target. One calibration of this host per thread count serves every
run on that many threads, so the profiles' times are scaled alike. The galaxy-s24 timelines go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_sleep.bench.provenance import provenance
from edge_sleep.simulate.calibrate import calibrate
from edge_sleep.simulate.day import POLICIES, SimulationConfig, simulate
from edge_sleep.simulate.profiles import load_profile, profile_names

RESULTS = Path(__file__).resolve().parent / "results"


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (profile, policy): seed spread of what docs/scheduling.md compares."""
    rows = []
    keys = sorted({(r["profile"], r["policy"]) for r in runs}, key=lambda k: (k[0], POLICIES.index(k[1])))
    for profile, policy in keys:
        mine = [r for r in runs if r["profile"] == profile and r["policy"] == policy]
        nights = [d for r in mine for d in r["days"]]
        shares = [d["battery_share"] for d in nights if d["battery_share"] is not None]
        peaks = [d["peak_memory_mb"] for d in nights if d["peak_memory_mb"] is not None]
        rows.append({
            "profile": profile,
            "policy": policy,
            "seeds": len(mine),
            "final_accuracy": _spread([r["final_accuracy"] for r in mine]),
            "forgetting": _spread([r["forgetting"] for r in mine]),
            "night_steps_per_day": statistics.fmean(d["night_steps"] for d in nights),
            "energy_j_per_night_day": statistics.fmean(d["energy_j"] for d in nights),
            "max_battery_share": max(shares) if shares else None,
            "peak_memory_mb": max(peaks) if peaks else None,
            "memory_budget_mb": mine[0]["memory_budget_mb"],
            "windows_missed": sum(d["windows_missed"] for d in nights),
            "windows_preempted": sum(d["windows_preempted"] for d in nights),
            "max_wall_s": max(r["targets"]["wall_s"] for r in mine),
            "fits_memory": all(r["targets"]["fits_memory"] for r in mine),
            "energy_under_2pct": None if not shares else max(shares) < 0.02,
            "notes": sorted({n for r in mine for n in r["targets"]["notes"]}),
        })
    return rows


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The table in docs/scheduling.md: one line per profile and policy."""
    head = ("| profile | policy | final accuracy (mean ± sd) | forgetting | replay steps / night | "
            "energy / night | battery / night | peak memory / budget | slowest run |")
    lines = [head, "|" + "---|" * 9]
    for r in summary:
        acc, fg = r["final_accuracy"], r["forgetting"]
        share = "mains" if r["max_battery_share"] is None else f"{r['max_battery_share']:.3%}"
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['profile']} | {r['policy']} | {acc['mean']:.3f} ± {acc['std']:.3f} | "
                     f"{fg['mean']:.3f} ± {fg['std']:.3f} | {r['night_steps_per_day']:.0f} | "
                     f"{r['energy_j_per_night_day']:.1f} J | {share} | {peak} / {r['memory_budget_mb']:.0f} MB | "
                     f"{r['max_wall_s']:.0f} s |")
    return "\n".join(lines)


def profile_table() -> str:
    """The profile rows of docs/scheduling.md, read from ``device_profiles/``."""
    lines = []
    for name in profile_names():
        p = load_profile(name)
        battery = "mains" if not p.has_battery else f"{p.battery_wh:g} Wh"
        lines.append(f"| {name} | {p.cores} | {p.memory_budget_mb:g} MB | {battery} | {p.power_use_w:g} / "
                     f"{p.power_idle_w:g} / +{p.power_active_w:g} W | {p.relative_speed:g}x | "
                     f"{p.day.usage_hours():g} h, {p.day.learn_steps_per_usage_hour * p.day.usage_hours():.0f} steps |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--profiles", nargs="+", default=None, help="default: every bundled profile")
    parser.add_argument("--out", type=Path, default=RESULTS / "simulate.json")
    args = parser.parse_args(argv)
    profiles = args.profiles or profile_names()
    # one calibration per thread count a night runs on (the profile's cores, at most this host's)
    counts = sorted({max(1, min(load_profile(n).cores, os.cpu_count() or 1)) for n in profiles})
    cals = {t: calibrate(threads=t) for t in counts}
    cal = cals[max(counts)]
    for t, c in cals.items():
        print(f"calibration on {t} thread(s): {c.host_seconds:.3f} s here vs {c.reference_seconds:.3f} s reference "
              f"(host_speed {c.host_speed:.2f})", flush=True)
    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in profiles:
            profile = load_profile(name)
            for policy in POLICIES:
                for seed in args.seeds:
                    out = Path(tmp) / f"{name}-{policy}-{seed}"
                    threads = max(1, min(profile.cores, os.cpu_count() or 1))
                    report = simulate(profile, out, SimulationConfig(days=args.days, policy=policy, seed=seed),
                                      calibration=cals[threads], progress=False)
                    if name == "galaxy-s24" and seed == args.seeds[0]:
                        (RESULTS / f"timeline-{name}-{policy}.png").write_bytes((out / "timeline.png").read_bytes())
                    runs.append(report)
                    print(f"{name:18s} {policy:8s} seed {seed}: accuracy {report['final_accuracy']:.3f}, "
                          f"forgetting {report['forgetting']:.3f}, {report['targets']['wall_s']:.0f} s", flush=True)
    summary = summarize(runs)
    result = {"command": "python benchmarks/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "days": args.days, "seeds": args.seeds, "calibration": cal.to_dict(),
              "wall_s": time.perf_counter() - t0, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    result.update(provenance())  # the commit the numbers describe
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, args.out)
    print(markdown_table(summary))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
