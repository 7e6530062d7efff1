"""Every bundled device profile: 3 days of both policies, and a week under the platforms' rules on a busy host.

    python benchmarks/simulate.py [--days 3] [--seeds 0 1 2] [--profiles galaxy-s24 ...]
                                  [--week-days 7] [--week-loads 0 1 2] [--parts compare week]
    python benchmarks/simulate.py --parts stress     # -> benchmarks/results/simulate_stress.json

For each profile, policy and seed it runs ``edge_sleep.simulate.day.simulate`` (the real wake and
sleep code on the profile's day; nights in a child process under the profile's threads and
memory budget) and writes ``benchmarks/results/simulate.json``: every run's per-day report, and
per profile and policy the mean and spread over seeds of the final accuracy, forgetting, replay
steps, energy per night and battery share, the peak memory against the budget, and each run's
wall time against the 10-minute target. Host time is CPU time, each process measured on the reference workload at its
own thread count (the simulator's for wake steps, each night's around it). The galaxy-s24 timelines
go to ``benchmarks/results/``.

The ``week`` part (issue 24) runs ``edge-sleep simulate --days 7 --platform --days-from drawn`` on
every profile three times, the same seed each time, with 0, 1 and 2 busy processes (``--week-loads``:
each spins one core in pure Python) competing for this host's CPU. It records per run the energy per
replay step, the kills, interruptions, skipped and missed nights, the work lost to a kill against the
checkpoint interval, the night's and the whole process's peak memory against the profile's budget
(with its source), and the calibrations' spread; per profile, how far the three runs' energy per
replay step are apart (target: within 20%).

The ``stress`` part (``--parts stress``, its own file ``simulate_stress.json``) runs the same week
once per profile with kills and interruptions far likelier than the profiles say
(:data:`STRESS`: every run has a one-in-two chance of a kill, and the user picks the device up
every two hours of a night) on a device 10x slower than the profile's, saving every 5 device seconds
(the demo's night is otherwise shorter than one checkpoint interval), so that kills land between
checkpoints and the work a kill loses can be checked against the checkpoint interval (target: never more than one interval plus the longest
stretch between two looks at the clock).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# before torch loads OpenMP: waiting threads sleep instead of spinning, so this process's CPU time (the wake
# steps') is its work, not time spent waiting for a core another program holds (the nights set it themselves)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edge_sleep.bench.provenance import provenance  # noqa: E402
from edge_sleep.simulate.day import POLICIES, SimulationConfig, simulate  # noqa: E402
from edge_sleep.simulate.profiles import load_profile, profile_names  # noqa: E402

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


def _spin(parent: int) -> None:
    """Keep one core busy until the parent is gone (a benchmark killed by a signal runs no ``finally``)."""
    x = 0
    while os.getppid() == parent:
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) % 2**31


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """``processes`` processes that each keep one core busy while the block runs."""
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_spin, args=(os.getpid(),), daemon=True) for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.terminate()
            w.join()


def energy_per_replay_step(report: dict[str, Any]) -> float | None:
    """Joules per replay step over the nights that were not killed (a killed run's steps since its last save are lost)."""
    kept = [n for n in report["nights"] if not n["killed"] and n["failure"] is None and n["steps"] > 0]
    steps = sum(n["steps"] for n in kept)
    return sum(n["energy_j"] for n in kept) / steps if steps else None


def week_run(report: dict[str, Any], load: int) -> dict[str, Any]:
    """What the week part keeps of one run."""
    plat, targets = report["platform"], report["targets"]
    peaks = [d["peak_memory_mb"] for d in report["days"] if d["peak_memory_mb"] is not None]
    process = [d["process_peak_mb"] for d in report["days"] if d["process_peak_mb"] is not None]
    return {
        "load": load, "energy_j_per_replay_step": energy_per_replay_step(report),
        "replay_steps": sum(d["night_steps"] for d in report["days"]),
        "night_runs": len(report["nights"]), "kills": plat["kills"], "interruptions": plat["interruptions"],
        "skipped_nights": plat["skipped_nights"], "start_delays": plat["start_delays"],
        "capped_runs": plat["capped_runs"], "missed_nights": report["missed_nights"],
        "windows_preempted": sum(d["windows_preempted"] for d in report["days"]),
        "checkpoint_interval_s": plat["checkpoint_interval_s"], "max_lost_s": plat["max_lost_s"],
        "max_check_gap_s": plat["max_check_gap_s"], "max_stop_s": plat["max_stop_s"],
        "lost_within_bound": plat["lost_within_bound"],
        "peak_memory_mb": max(peaks) if peaks else None, "process_peak_mb": max(process) if process else None,
        "memory_budget_mb": report["memory_budget_mb"], "memory_budget_source": targets["memory_budget_source"],
        "fits_memory": targets["fits_memory"], "process_fits_memory": targets["process_fits_memory"],
        "calibration_disagreement": report["calibration"]["disagreement"],
        "final_accuracy": report["final_accuracy"], "forgetting": report["forgetting"], "wall_s": targets["wall_s"],
        "threads": report["threads"], "calibration": report["calibration"],
        "nights": [{k: n[k] for k in ("day", "start_h", "steps", "completed", "killed", "capped", "interrupted",
                                       "host_cpu_s", "device_s", "energy_j", "lost_s")} for n in report["nights"]],
    }


def week_row(profile: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One profile's three runs: the energy per replay step's spread and the targets."""
    energy = [r["energy_j_per_replay_step"] for r in runs if r["energy_j_per_replay_step"] is not None]
    spread = max(energy) / min(energy) - 1.0 if len(energy) > 1 else None
    return {
        "profile": profile, "runs": runs, "energy_per_step_spread": spread,
        "energy_within_20pct": None if spread is None else spread <= 0.20,
        "kills": sum(r["kills"] for r in runs), "max_lost_s": max(r["max_lost_s"] for r in runs),
        "lost_within_bound": all(r["lost_within_bound"] for r in runs),
        "wall_s_by_load": {str(r["load"]): r["wall_s"] for r in runs},
    }


def week_table(rows: list[dict[str, Any]]) -> str:
    """The week's table in docs/scheduling.md."""
    head = ("| profile | J / replay step (loads " + ", ".join(str(r["load"]) for r in rows[0]["runs"]) + ") | spread | "
            "kills | interruptions | skipped / missed nights | most lost (interval) | peak memory: night / process / budget |")
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        runs = row["runs"]
        energy = ", ".join("-" if r["energy_j_per_replay_step"] is None else f"{r['energy_j_per_replay_step'] * 1000:.1f} mJ"
                           for r in runs)
        spread = "-" if row["energy_per_step_spread"] is None else f"{row['energy_per_step_spread']:.0%}"
        first = runs[0]
        lines.append(
            f"| {row['profile']} | {energy} | {spread} | {sum(r['kills'] for r in runs)} | "
            f"{sum(r['interruptions'] for r in runs)} | {sum(r['skipped_nights'] for r in runs)} / "
            f"{sum(r['missed_nights'] for r in runs)} | {row['max_lost_s']:.1f} s ({first['checkpoint_interval_s']:g} s) | "
            f"{max(r['peak_memory_mb'] or 0 for r in runs):.0f} / {max(r['process_peak_mb'] or 0 for r in runs):.0f} / "
            f"{first['memory_budget_mb']:.0f} MB |")
    return "\n".join(lines)


STRESS = {"kill_probability": 0.5, "interruptions_per_hour": 0.5}
# the demo's night takes a few device seconds on these profiles, less than a 60 s checkpoint interval, so a
# kill could never lose more than the interval: the stress week makes the device 10x slower (nights of tens
# of seconds) and saves every 5 device seconds, so kills land between checkpoints and the bound is tested
STRESS_SLOWDOWN = 10.0
STRESS_CHECKPOINT_S = 5.0


def run_stress(profiles: list[str], days: int, tmp: Path) -> list[dict[str, Any]]:
    """One week per profile under :data:`STRESS` (and the profile's other rules)."""
    rows = []
    for name in profiles:
        profile = load_profile(name)
        rules = profile.platform
        assert rules is not None, f"{name} has no [platform] table"
        sources = {**profile.sources, **{f"platform.{k}": f"stress test: {v} (not the platform's figure)"
                                         for k, v in STRESS.items()},
                   "relative_speed": f"stress test: the profile's {profile.relative_speed:g} / {STRESS_SLOWDOWN:g}"}
        stressed = dataclasses.replace(profile, platform=dataclasses.replace(rules, **STRESS), sources=sources,
                                       relative_speed=profile.relative_speed / STRESS_SLOWDOWN)
        config = SimulationConfig(days=days, policy="fixed", seed=0, platform=True, days_from="drawn",
                                  checkpoint_every_s=STRESS_CHECKPOINT_S)
        report = simulate(stressed, tmp / f"stress-{name}", config, progress=False)
        run = week_run(report, 0)
        rows.append({"profile": name, **{k: run[k] for k in (
            "kills", "interruptions", "skipped_nights", "capped_runs", "missed_nights", "night_runs", "replay_steps",
            "checkpoint_interval_s", "max_lost_s", "max_check_gap_s", "max_stop_s", "lost_within_bound",
            "final_accuracy", "wall_s", "nights")}})
        print(f"stress {name:18s}: {run['kills']} kills, lost <= {run['max_lost_s']:.1f} s "
              f"(interval {run['checkpoint_interval_s']:g} s, check gap {run['max_check_gap_s'] or 0:.1f} s), "
              f"{run['interruptions']} interruptions, {run['wall_s']:.0f} s", flush=True)
    return rows


def stress_table(rows: list[dict[str, Any]]) -> str:
    """The stress week's table in docs/scheduling.md."""
    lines = ["| profile | night runs | kills | interruptions | most work lost to a kill | interval + longest check gap "
             "| longest stop | within bound |", "|" + "---|" * 8]
    for r in rows:
        bound = r["checkpoint_interval_s"] + (r["max_check_gap_s"] or 0.0)
        stop = "-" if r["max_stop_s"] is None else f"{r['max_stop_s']:.1f} s"
        lines.append(f"| {r['profile']} | {r['night_runs']} | {r['kills']} | {r['interruptions']} | "
                     f"{r['max_lost_s']:.1f} s | {bound:.1f} s | {stop} | {'yes' if r['lost_within_bound'] else 'NO'} |")
    return "\n".join(lines)


def run_week(profiles: list[str], days: int, loads: list[int], tmp: Path, threads: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in profiles:
        profile = load_profile(name)
        runs = []
        for load in loads:
            config = SimulationConfig(days=days, policy="fixed", seed=0, platform=True, days_from="drawn",
                                      threads=threads)
            with busy(load):
                report = simulate(profile, tmp / f"week-{name}-{load}", config, progress=False)
            runs.append(week_run(report, load))
            r = runs[-1]
            print(f"week {name:18s} load {load}: {r['energy_j_per_replay_step'] or 0:.4f} J/step, {r['kills']} kills, "
                  f"{r['missed_nights']} missed nights, lost <= {r['max_lost_s']:.1f} s, {r['wall_s']:.0f} s", flush=True)
        rows.append(week_row(name, runs))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--profiles", nargs="+", default=None, help="default: every bundled profile")
    parser.add_argument("--week-days", type=int, default=7)
    parser.add_argument("--week-loads", type=int, nargs="+", default=[0, 1, 2],
                        help="busy processes competing with each of the week's runs")
    parser.add_argument("--week-threads", type=int, default=None,
                        help="host threads of the week's runs (default: the profile's cores, at most this host's)")
    parser.add_argument("--parts", nargs="+", choices=["compare", "week", "stress"], default=["compare", "week"],
                        help="stress runs alone and writes simulate_stress.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "simulate.json")
    args = parser.parse_args(argv)
    profiles = args.profiles or profile_names()
    if "stress" in args.parts:
        if args.parts != ["stress"]:
            parser.error(f"--parts {' '.join(args.parts)}: stress writes its own file; run it alone")
        return stress_main(args, profiles, argv)
    runs = []
    week: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "week" in args.parts:
            week = run_week(profiles, args.week_days, args.week_loads, Path(tmp), args.week_threads)
        for name in profiles if "compare" in args.parts else []:
            profile = load_profile(name)
            for policy in POLICIES:
                for seed in args.seeds:
                    out = Path(tmp) / f"{name}-{policy}-{seed}"
                    report = simulate(profile, out, SimulationConfig(days=args.days, policy=policy, seed=seed),
                                      progress=False)
                    if name == "galaxy-s24" and seed == args.seeds[0]:
                        (RESULTS / f"timeline-{name}-{policy}.png").write_bytes((out / "timeline.png").read_bytes())
                    runs.append(report)
                    print(f"{name:18s} {policy:8s} seed {seed}: accuracy {report['final_accuracy']:.3f}, "
                          f"forgetting {report['forgetting']:.3f}, {report['targets']['wall_s']:.0f} s", flush=True)
    summary = summarize(runs) if runs else []
    result = {"command": "python benchmarks/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "days": args.days, "seeds": args.seeds, "clock": "cpu",
              "wall_s": time.perf_counter() - t0, "summary": summary, "runs": runs,
              "week": {"days": args.week_days, "loads": args.week_loads, "policy": "fixed", "platform": True,
                       "days_from": "drawn", "seed": 0, "threads": args.week_threads, "rows": week}}
    _write(result, args.out)
    if summary:
        print(markdown_table(summary))
    if week:
        print(week_table(week))
    print(f"wrote {args.out}")
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    """``result`` with the commit the numbers describe, written to ``out`` atomically."""
    result.update(provenance())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, out)


def stress_main(args: argparse.Namespace, profiles: list[str], argv: list[str] | None) -> dict[str, Any]:
    out = args.out if args.out != RESULTS / "simulate.json" else RESULTS / "simulate_stress.json"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_stress(profiles, args.week_days, Path(tmp))
    result = {"command": "python benchmarks/simulate.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "days": args.week_days, "stress": STRESS, "slowdown": STRESS_SLOWDOWN,
              "checkpoint_every_s": STRESS_CHECKPOINT_S, "policy": "fixed", "days_from": "drawn", "seed": 0,
              "clock": "cpu", "wall_s": time.perf_counter() - t0, "rows": rows}
    _write(result, out)
    print(stress_table(rows))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
