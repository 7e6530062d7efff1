"""Command line: ``edge-sleep demo``, ``bench``, ``export``, ``profile``, ``simulate``, ``watch`` and ``audit``."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "run_audit", "run_demo", "run_export", "run_profile"]


def _plot_matrices(mats: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mats), figsize=(5.5 * len(mats), 4.6), layout="constrained")
    for ax, (title, acc) in zip(np.atleast_1d(axes), mats.items()):
        shown = np.ma.masked_invalid(acc)
        im = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="viridis")
        t = acc.shape[0]
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center",
                        color="white" if acc[i, j] < 0.6 else "black", fontsize=9)
        ax.set_xticks(range(t), [f"T{j + 1}" for j in range(t)])
        ax.set_yticks(range(t), [f"after T{i + 1}" for i in range(t)])
        ax.set_xlabel("evaluated task")
        ax.set_title(f"{title}\nfinal average {np.nanmean(acc[-1]):.3f}")
    fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8, label="test accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _format_matrix(acc: np.ndarray) -> str:
    t = acc.shape[0]
    head = " " * 9 + "".join(f"{f'T{j + 1}':>7s}" for j in range(t))
    rows = [head]
    for i in range(t):
        cells = "".join(f"{acc[i, j]:7.3f}" if j <= i else f"{'-':>7s}" for j in range(t))
        rows.append(f"after T{i + 1:<2d}{cells}")
    return "\n".join(rows)


def _one_line(error: BaseException | str) -> str:
    """``error``'s message on one line (multi-line messages joined by spaces)."""
    return " ".join(str(error).split()) or type(error).__name__


def _fail(command: str, error: BaseException | str) -> int:
    """Print ``edge-sleep COMMAND: MESSAGE`` as one line on stderr; the exit code of a refused command (2)."""
    print(f"edge-sleep {command}: {_one_line(error)}", file=sys.stderr)
    return 2


def _check_out_file(path: Path, flag: str) -> None:
    """Refuse an output file path that is a folder or sits where no file can be written (nothing is kept).

    Raises:
        InputError: ``path`` is a folder, or its folder cannot be created or written.
    """
    from edge_sleep.errors import InputError

    if path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a folder; expected the path of a file to write. "
                         f"Fix: pass a file name, e.g. {str(path / 'out.png')!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e} in {str(path.parent)!r}); "
                         "expected a file in a writable folder. Fix: pass a path in a folder you can write.") from None


def _check_out_folder(path: Path, flag: str) -> None:
    """Refuse an output folder path that is a file or cannot be created (created if missing).

    Raises:
        InputError: ``path`` exists and is not a folder, or it cannot be created or written.
    """
    from edge_sleep.errors import InputError

    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a file, not a folder; expected a folder (or nothing) at that "
                         "path to write into. Fix: remove or rename that file, or pass another folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise InputError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e}); expected a writable "
                         "folder. Fix: pass a folder you can write, on a disk with free space.") from None


def run_demo(tasks: int = 5, train_per_task: int = 20000, test_per_task: int = 2000,
             seed: int = 0, out: Path = Path("edge-sleep-demo.png"), profile: str = "galaxy-s24",
             days: int = 2) -> dict[str, np.ndarray]:
    """Permuted MNIST, short: the same stream learned three ways, then simulated days on a phone.

    1. all weights by day, no sleep; 2. the same day plus a nightly sleep; 3. the on-device
    path: a base first trained on task 1, LoRA adapters (rank 8) by day, a nightly sleep that
    merges and consolidates them. No replay while awake in any of them. Then the on-device path
    lives ``days`` simulated days on ``profile`` (:mod:`edge_sleep.simulate.day`): learning while
    the phone is used, sleeping when it charges; its timeline goes beside ``out``.

    Raises:
        ProfileError: ``profile`` is unknown or invalid (checked before any training).
        InputError: ``out`` is a folder or cannot be written (checked before any training).
    """
    import torch
    from tqdm import tqdm

    from edge_sleep.bench.datasets import permuted_mnist
    from edge_sleep.bench.metrics import average_accuracy, forgetting
    from edge_sleep.bench.pmnist import evaluate, mlp, pretrain
    from edge_sleep.config import SleepConfig, StoreConfig, WakeConfig
    from edge_sleep.runtime import EdgeSleep
    from edge_sleep.simulate.profiles import load_profile

    prof = load_profile(profile)  # a wrong name fails now, not after the training (even with days=0)
    _check_out_file(out, "--out")
    torch.set_num_threads(2)
    stream = permuted_mnist(tasks, seed, train_per_task=train_per_task, test_per_task=test_per_task)
    sleep = SleepConfig(steps_per_wake_step=2.0)
    runs: dict[str, tuple[WakeConfig, SleepConfig | None, bool]] = {
        "wake only (no sleep)": (WakeConfig(train="all", lr=0.1, replay_batch=0), None, False),
        "wake + nightly sleep": (WakeConfig(train="all", lr=0.1, replay_batch=0), sleep, False),
        "adapters + nightly sleep (pretrained base)": (
            WakeConfig(train="adapters", lora_rank=8, lr=0.1, replay_batch=0), sleep, True),
    }
    steps_per_task = -(-train_per_task // 128)
    total = sum(steps_per_task * (int(p) + tasks * (1 + (0 if s is None else s.steps_per_wake_step)))
                for _, s, p in runs.values())
    mats: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    with tqdm(total=int(total), desc="demo", unit="step") as bar, tempfile.TemporaryDirectory() as d:
        for k, (title, (wake, sleep_cfg, pretrained)) in enumerate(runs.items()):
            model = mlp(seed)
            if pretrained:
                bar.set_postfix_str(f"{title}, pretraining on T1")
                pretrain(model, stream[0], lr=0.1)
                bar.update(steps_per_task)
            es = EdgeSleep(model, store=Path(d) / f"replay{k}.db",
                           store_config=StoreConfig(capacity_records=500), wake=wake,
                           sleep=sleep_cfg or SleepConfig(), seed=seed)
            acc = np.full((tasks, tasks), np.nan)
            for i, task in enumerate(stream):
                bar.set_postfix_str(f"{title}, day {i + 1}")
                for x, y in task.batches(128):
                    es.learn(x, y, stream=task.name)
                    bar.update(1)
                if sleep_cfg is not None:
                    bar.set_postfix_str(f"{title}, night {i + 1}")
                    es.sleep(progress=bar.update)
                for j in range(i + 1):
                    acc[i, j] = evaluate(es, stream[j])
            es.store.close()
            mats[title] = acc
    for title, acc in mats.items():
        print(f"\n{title}: average accuracy {average_accuracy(acc):.3f}, forgetting {forgetting(acc):.3f}")
        print(_format_matrix(acc))
    _plot_matrices(mats, out)
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")
    if days > 0:
        import shutil

        from edge_sleep.simulate.day import SimulationConfig, simulate

        timeline = out.with_name(out.stem + "-timeline.png")
        print(f"\nthe on-device path, {days} simulated day(s) on {prof.name}: learning while the phone is in use, "
              "sleeping when it charges")
        with tempfile.TemporaryDirectory() as d:
            report = simulate(prof, Path(d), SimulationConfig(days=days, seed=seed, test_per_task=test_per_task,
                                                              train_per_task=min(12000, train_per_task)))
            shutil.copyfile(Path(d) / "timeline.png", timeline)
        print(_format_days(report))
        print(f"wrote {timeline} ({time.perf_counter() - t0:.0f} s in all)")
    return mats


def _model_factory(spec: str) -> object:
    """``"package.module:callable"`` -> the callable (which returns a fresh model).

    Raises:
        InputError: ``spec`` is not ``MODULE:CALLABLE``, does not import, or names no callable.
    """
    from edge_sleep.errors import ConfigError, InputError
    from edge_sleep.modelio import import_model_factory

    try:
        return import_model_factory(spec)
    except ConfigError as e:
        raise InputError(f"--model {'; '.join(e.problems)}. Fix: pass MODULE:CALLABLE, a function that "
                         "returns a fresh model of the checkpoint's architecture.") from None


def run_profile(path: Path, *, runs: int = 50, batch: int = 1, top: int = 25) -> int:
    """Print ExecuTorch's per-operator timing of an exported inference program."""
    from edge_sleep.errors import EdgeSleepError
    from edge_sleep.export.profile import format_profile, profile_program, resolve_program

    try:
        directory, name = resolve_program(path)
        frame = profile_program(directory, name, runs=runs, batch=batch)
    except EdgeSleepError as e:
        return _fail("profile", e)
    print(f"{directory / (name + '.pte')}: {runs} runs at batch {batch}, the {min(top, len(frame))} slowest "
          "events by median (ExecuTorch ETDump + Inspector)")
    print(format_profile(frame, top))
    return 0


def run_export(checkpoint: Path, out: Path, model_spec: str, *, int8: bool = True, onnx: bool = True,
               max_batch: int = 64, etrecord: bool = False) -> int:
    """Load a checkpoint around a fresh model from ``model_spec`` and export its programs.

    A bad ``--model``, checkpoint or ``--out`` prints one line on stderr and returns 2, before
    any program is lowered.
    """
    import torch

    from edge_sleep.errors import EdgeSleepError, InputError
    from edge_sleep.export import export_programs
    from edge_sleep.runtime import EdgeSleep

    t0 = time.perf_counter()
    try:
        model = _model_factory(model_spec)()  # type: ignore[operator]
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"--model {model_spec!r} returned a {type(model).__name__}; expected an nn.Module. "
                             "Fix: name a callable that returns a fresh model.")
        es = EdgeSleep.load(checkpoint, model, store=":memory:")
        try:
            manifest = export_programs(es, None, out, int8=int8, onnx=onnx, max_batch=max_batch,
                                       etrecord=etrecord)
        finally:
            es.store.close()
    except (EdgeSleepError, OSError) as e:
        return _fail("export", e)
    for name, info in sorted(manifest.files.items()):
        print(f"{info['bytes']:>12,d}  {out / name}")
    print(f"exported {', '.join(sorted(manifest.programs))} in {time.perf_counter() - t0:.0f} s")
    return 0


def _format_days(report: dict[str, Any]) -> str:
    """The simulator's per-day table and its notes."""
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{report['profile_name']} ({report['profile']}), {len(report['days'])} day(s), {report['policy']} "
             f"policy, memory budget {report['memory_budget_mb']:.0f} MB",
             f"{'day':>4s} {'accuracy':>9s} {'forget':>7s} {'wake':>5s} {'night':>6s} {'used':>5s} {'missed':>6s} "
             f"{'preempt':>7s} {'night J':>8s} {'battery':>8s} {'peak MB':>8s}"]
    for d in report["days"]:
        lines.append(f"{d['day']:>4d} {f(d['accuracy'], '.3f'):>9s} {f(d['forgetting'], '.3f'):>7s} "
                     f"{d['wake_steps']:>5d} {d['night_steps']:>6d} {d['windows_used']:>5d} {d['windows_missed']:>6d} "
                     f"{d['windows_preempted']:>7d} {d['energy_j']:>8.1f} {f(d['battery_share'], '.3%'):>8s} "
                     f"{f(d['peak_memory_mb'], '.0f'):>8s}")
    if report.get("days_from", "typical") != "typical":
        lines += [f"day {d['day']}: {d['plan']['source'].split('; typical day:')[0]}" for d in report["days"]]
    lines += [f"note: {note}" for note in report["targets"]["notes"]]
    plat = report.get("platform") or {}
    if plat.get("rules"):
        lines.append(f"platform rules: {plat['kills']} kill(s), {plat['interruptions']} interruption(s), "
                     f"{plat['skipped_nights']} skipped night(s), {plat['start_delays']} delayed start(s), "
                     f"{plat['capped_runs']} run(s) stopped at the OS's cap; checkpoint every "
                     f"{plat['checkpoint_interval_s']:g} s, most work lost to a kill {plat['max_lost_s']:.1f} s")
    return "\n".join(lines)


def run_simulate(profile: str, days: int, out: Path, policy: str, seed: int, calibration: Path | None,
                 platform: bool = False, checkpoint_every_s: float = 60.0, days_from: str | None = None,
                 trace: Path | None = None, tz: str | None = None) -> int:
    """``edge-sleep simulate``: one profile, ``days`` days; prints the per-day summary."""
    import json

    from edge_sleep.errors import EdgeSleepError
    from edge_sleep.simulate.calibrate import Calibration
    from edge_sleep.simulate.day import SimulationConfig, day_plans, simulate
    from edge_sleep.simulate.profiles import load_profile

    try:
        prof = load_profile(profile)
        config = SimulationConfig(days=days, policy=policy, seed=seed, platform=platform,
                                  checkpoint_every_s=checkpoint_every_s,
                                  days_from=days_from or ("trace" if trace is not None else "typical"),
                                  trace=None if trace is None else str(trace), tz=tz)
        try:
            day_plans(prof, config)  # a bad trace or a profile without [variation] fails here, before any work
        except OSError as e:
            return _fail("simulate", f"--trace {str(trace)!r} cannot be read ({_one_line(e)}); expected a CSV trace "
                                     "(see tools/day_from_trace.py). Fix: check the path")
        cal = None
        if calibration is not None:
            cal = Calibration.from_dict(json.loads(calibration.read_text()))
        _check_out_folder(out, "--out")
    except EdgeSleepError as e:
        return _fail("simulate", e)
    except (OSError, ValueError, KeyError, TypeError) as e:  # only the calibration file is read above
        what = f"lacks the key {e}" if isinstance(e, KeyError) else f"cannot be read ({_one_line(e)})"
        return _fail("simulate", f"--calibration {str(calibration)!r} {what}; expected a JSON object written by "
                                 "tools/calibrate.py. Fix: run tools/calibrate.py again, or leave --calibration out.")
    report = simulate(prof, out, config, calibration=cal)
    print()
    print(_format_days(report))
    print(f"wrote {out / 'report.json'}, {out / 'timeline.png'} ({report['targets']['wall_s']:.0f} s)")
    return 0


def run_fleet_simulate(out: Path, **settings: Any) -> int:
    """``edge-sleep fleet simulate``: a simulated fleet; prints the report, writes report.json and fleet.png."""
    import json

    from edge_sleep.errors import EdgeSleepError
    from edge_sleep.simulate.profiles import load_profile

    try:
        from edge_sleep.fleet.simulate import FleetSimulation, format_report, plot_report, simulate_fleet

        config = FleetSimulation(**settings)
        load_profile(config.profile)
        _check_out_folder(out, "--out")
        if (out / "clients").exists():
            raise ValueError(f"--out {str(out)!r} holds a fleet's clients/ already; expected a new folder. "
                             "Fix: pass another --out, or remove that one")
    except ImportError as e:
        return _fail("fleet simulate", f"{_one_line(e)}; the fleet needs Flower. Fix: pip install "
                                       "'edge-sleep[fleet]' 'flwr[simulation]'")
    except (EdgeSleepError, ValueError) as e:
        return _fail("fleet simulate", e)
    report = simulate_fleet(config, out / "clients")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_report(report, out / "fleet.png")
    print(format_report(report))
    print(f"wrote {out / 'report.json'}, {out / 'fleet.png'}")
    return 0


def run_watch(checkpoint: Path, model_spec: str, policy: str, poll_s: float, min_idle_s: float,
              polls: int | None, *, mains: bool = False, activity_file: Path | None = None,
              use_terminals: bool = False, max_cpu_load: float = 0.5) -> int:
    """``edge-sleep watch``: poll the real probes and sleep the checkpoint when the policy allows."""
    from edge_sleep.errors import EdgeSleepError
    from edge_sleep.schedule import AdaptivePolicy, IdleAndCharging, LinuxProbe
    from edge_sleep.watch import watch

    try:
        factory = _model_factory(model_spec)
        device = IdleAndCharging(min_idle_s=min_idle_s, max_cpu_load=max_cpu_load)
        chosen = device if policy == "fixed" else AdaptivePolicy(device=device)
        probe = LinuxProbe(mains=mains, activity_file=activity_file, use_terminals=use_terminals)
        watch(checkpoint, factory, policy=chosen, probe=probe, poll_s=poll_s, max_polls=polls,  # type: ignore[arg-type]
              log=lambda line: print(line, flush=True))
    except EdgeSleepError as e:
        return _fail("watch", e)
    except KeyboardInterrupt:
        return 0
    return 0


def _load_examples(path: Path, flag: str) -> tuple[Any, Any]:
    """``(x, y)`` from a ``torch.save``d ``{"x": ..., "y": ...}`` or ``(x, y)``."""
    import torch

    from edge_sleep.errors import InputError, first_line

    try:
        obj = torch.load(path, weights_only=True)
    except Exception as e:  # a damaged file raises OSError, EOFError, KeyError, UnpicklingError, ...
        reason = first_line(e, "no detail")
        raise InputError(f"{flag} {str(path)!r} could not be read ({type(e).__name__}: {reason}); expected a file "
                         "written by torch.save({'x': x, 'y': y}, path). Fix: pass such a file.") from None
    pair = (obj.get("x"), obj.get("y")) if isinstance(obj, dict) else tuple(obj) if isinstance(obj, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
        raise InputError(f"{flag} {str(path)!r} holds a {type(obj).__name__}; expected {{'x': tensor, 'y': tensor}} "
                         "or (x, y). Fix: torch.save({'x': x, 'y': y}, path).")
    return pair[0], pair[1]


def run_audit(checkpoint: Path, model_spec: str, heldout: Path, members: Path | None, reference: Path | None,
              out: Path | None, store_key_file: Path | None) -> int:
    """``edge-sleep audit``: membership inference against a saved runtime (:mod:`edge_sleep.audit`)."""
    import json

    from edge_sleep.audit import audit
    from edge_sleep.errors import EdgeSleepError, InputError
    from edge_sleep.runtime import EdgeSleep

    opened: list[EdgeSleep] = []
    try:
        factory = _model_factory(model_spec)
        nonmember = _load_examples(heldout, "--heldout")
        member = None if members is None else _load_examples(members, "--members")
        try:
            key = None if store_key_file is None else store_key_file.read_bytes()
        except OSError as e:
            raise InputError(f"--store-key-file {str(store_key_file)!r} cannot be read ({e.strerror or e}); expected "
                             "the raw key bytes of the encrypted store. Fix: pass the file that holds them.") from None
        # the store is opened (and its writer lock taken) only when its records are the members
        es = EdgeSleep.load(checkpoint, factory(), store=":memory:" if member is not None else None,  # type: ignore[operator]
                            store_key=key)
        opened.append(es)
        if member is None:
            report = es.store.privacy_report()
            if report.private or report.labels_randomized:
                raise InputError(f"the store of {str(checkpoint)!r} holds {report.private} noised and "
                                 f"{report.labels_randomized} label-randomized records; those are not the examples "
                                 "an attacker would test. Fix: pass --members FILE with the raw examples behind them.")
            if es.store_config.latent_layer is not None:
                raise InputError(f"the store keeps hidden states of {es.store_config.latent_layer!r}, not model "
                                 "inputs. Fix: pass --members FILE with the examples behind them.")
            slots = es.store.slots()
            if len(slots) < 2:
                raise InputError(f"the store of {str(checkpoint)!r} holds {len(slots)} records; expected at least 2 "
                                 "members. Fix: audit after learning, or pass --members FILE.")
            batch = es.store.read(slots)
            member = (batch.x, batch.y)
        ref = None
        if reference is not None:
            ref = EdgeSleep.load(reference, factory(), store=":memory:")  # type: ignore[operator]
            opened.append(ref)
        result = audit(es, member, nonmember, reference=ref)
    except (EdgeSleepError, OSError) as e:
        return _fail("audit", e)
    finally:
        for runtime in opened:
            runtime.store.close()
    print(result.text())
    if out is not None:
        try:
            out.write_text(json.dumps(result.to_dict(), indent=2))
        except OSError as e:
            return _fail("audit", f"--json {str(out)!r} cannot be written ({e.strerror or e}); expected a file "
                                  "path in a writable folder. Fix: pass another --json path.")
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-sleep", description="On-device continual learning with sleep.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="short Permuted-MNIST run: no sleep, sleep, adapters + sleep, then "
                                       "simulated days on a phone profile (about 2 minutes on 2 cores)")
    demo.add_argument("--tasks", type=int, default=5)
    demo.add_argument("--train-per-task", type=int, default=20000)
    demo.add_argument("--test-per-task", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("edge-sleep-demo.png"))
    demo.add_argument("--profile", default="galaxy-s24", help="the device profile of the simulated days")
    demo.add_argument("--days", type=int, default=2, help="simulated days on the profile (0: none)")
    sub.add_parser("bench", help="the Permuted-MNIST benchmark (benchmarks/pmnist.py); pass its flags after --",
                   add_help=False)
    export = sub.add_parser("export", help="write the ExecuTorch programs (infer.pte, infer_int8.pte, "
                                           ".ptd weights), model.onnx and manifest.json of a checkpoint")
    export.add_argument("checkpoint", type=Path, help="a folder written by EdgeSleep.save()")
    export.add_argument("--out", type=Path, required=True, help="the export folder (replaced atomically)")
    export.add_argument("--model", default="edge_sleep.bench.pmnist:mlp",
                        help="MODULE:CALLABLE returning a fresh model of the checkpoint's architecture "
                             "(default: the demo's MLP)")
    export.add_argument("--no-int8", action="store_true", help="skip infer_int8.pte")
    export.add_argument("--no-onnx", action="store_true", help="skip model.onnx")
    export.add_argument("--max-batch", type=int, default=64, help="largest batch the programs take")
    export.add_argument("--etrecord", action="store_true",
                        help="also write infer.etrecord, which `edge-sleep profile` uses to name operators")
    prof = sub.add_parser("profile", help="per-operator timing of an exported infer.pte (ETDump + Inspector)")
    prof.add_argument("program", type=Path, help="infer.pte (or infer_int8.pte) in an export folder, or the folder")
    prof.add_argument("--runs", type=int, default=50)
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--top", type=int, default=25, help="how many of the slowest events to print")
    sim = sub.add_parser("simulate", help="replay days of a device profile on a virtual clock: wake learning, "
                                          "nights when the policy allows; writes report.json and timeline.png")
    sim.add_argument("--profile", required=True,
                     help="a profile name in device_profiles/ (e.g. galaxy-s24) or a path to a .toml file")
    sim.add_argument("--days", type=int, default=3)
    sim.add_argument("--out", type=Path, default=Path("simulation"))
    sim.add_argument("--policy", choices=["fixed", "adaptive"], default="fixed",
                     help="fixed: idle and charging, one replay step per wake step; adaptive: sleep pressure")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--platform", action="store_true",
                     help="apply the profile's [platform] rules: the OS's cap, start delay, skipped nights, "
                          "interruptions and kills")
    sim.add_argument("--checkpoint-every-s", type=float, default=60.0,
                     help="with --platform: the night saves its progress every this many device seconds (default 60)")
    sim.add_argument("--days-from", choices=["typical", "drawn", "trace"], default=None,
                     help="typical: the profile's [day] every day (the default); drawn: each day drawn from it with "
                          "the profile's [variation] (shifted sessions, missed overnight charges, daytime top-ups); "
                          "trace: the whole days of --trace in order")
    sim.add_argument("--trace", type=Path, default=None,
                     help="a CSV trace (see tools/day_from_trace.py) replayed day by day (implies --days-from trace)")
    sim.add_argument("--tz", default=None,
                     help="the trace's time zone, e.g. America/Los_Angeles or +01:00 (needed for unix seconds)")
    sim.add_argument("--calibration", type=Path, default=None,
                     help="a fixed calibration, a JSON written by tools/calibrate.py (default: measure this host's CPU time on "
                          "the reference workload in the simulator's process and around every night, in its process)")
    watch = sub.add_parser("watch", help="on a Linux device: poll battery, charging, idle and thermal state; "
                                         "sleep the saved runtime when the policy allows")
    watch.add_argument("checkpoint", type=Path, help="a folder written by EdgeSleep.save()")
    watch.add_argument("--model", default="edge_sleep.bench.pmnist:mlp",
                       help="MODULE:CALLABLE returning a fresh model of the checkpoint's architecture")
    watch.add_argument("--policy", choices=["fixed", "adaptive"], default="fixed")
    watch.add_argument("--poll-s", type=float, default=60.0)
    watch.add_argument("--min-idle-s", type=float, default=900.0)
    watch.add_argument("--polls", type=int, default=None, help="stop after this many polls (default: never)")
    watch.add_argument("--mains", action="store_true",
                       help="the device runs on mains power (a board with no charger to read): count it as charging")
    watch.add_argument("--activity-file", type=Path, default=None,
                       help="a file the app touches when its user is active (edge_sleep.schedule.mark_activity); "
                            "idle time counts from its last change")
    watch.add_argument("--use-terminals", action="store_true",
                       help="also count terminal input as activity (a laptop someone types on)")
    watch.add_argument("--max-cpu-load", type=float, default=0.5,
                       help="wait while other processes keep more than this share of the cores busy (default 0.5)")
    fleet = sub.add_parser("fleet", help="a fleet of phones learning together on Flower")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    fsim = fleet_sub.add_parser("simulate", help="simulate a fleet on Flower's simulation engine: each client its own "
                                                 "Permuted-MNIST tasks, nights and rounds when its phone charges; "
                                                 "writes report.json and fleet.png")
    fsim.add_argument("--clients", type=int, default=4)
    fsim.add_argument("--rounds", type=int, default=3)
    fsim.add_argument("--profile", default="galaxy-s24", help="the device profile of every client")
    fsim.add_argument("--tasks", type=int, default=20, help="Permuted-MNIST tasks in the pool")
    fsim.add_argument("--tasks-per-client", type=int, default=3)
    fsim.add_argument("--examples-per-day", type=int, default=1024)
    fsim.add_argument("--mode", choices=["fleet", "alone"], default="fleet",
                      help="alone: the same days and nights on each client, no rounds (the control)")
    fsim.add_argument("--no-nights", action="store_true", help="the fleet without nights")
    fsim.add_argument("--payload", choices=["weights", "delta", "adapters"], default="adapters")
    fsim.add_argument("--no-int8", action="store_true", help="send float32")
    fsim.add_argument("--merge", choices=["fedavg", "fisher"], default="fedavg")
    fsim.add_argument("--epsilon", type=float, default=None, help="differential privacy of each client over the rounds")
    fsim.add_argument("--clip", type=float, default=1.0, help="with --epsilon: the norm each update is clipped to")
    fsim.add_argument("--seed", type=int, default=0)
    fsim.add_argument("--out", type=Path, default=Path("fleet-simulation"))
    aud = sub.add_parser("audit", help="membership inference against a saved runtime: can the model tell the "
                                       "store's examples from held-out ones? (ROC AUC, TPR at 1%% FPR)")
    aud.add_argument("checkpoint", type=Path, help="a folder written by EdgeSleep.save()")
    aud.add_argument("--heldout", type=Path, required=True,
                     help="non-members: torch.save({'x': x, 'y': y}) of held-out examples of the same distribution")
    aud.add_argument("--members", type=Path, default=None,
                     help="the examples behind the store's records, saved alike (default: the records themselves, "
                          "for a store without privacy that keeps model inputs)")
    aud.add_argument("--reference", type=Path, default=None,
                     help="a checkpoint trained the same way without these members: calibrates the second attack "
                          "(default: per-class calibration on half of --heldout)")
    aud.add_argument("--model", default="edge_sleep.bench.pmnist:mlp",
                     help="MODULE:CALLABLE returning a fresh model of the checkpoint's architecture")
    aud.add_argument("--store-key-file", type=Path, default=None, help="the key of an encrypted store, raw bytes")
    aud.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args, rest = parser.parse_known_args(argv)
    if args.command == "audit":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_audit(args.checkpoint, args.model, args.heldout, args.members, args.reference, args.json,
                         args.store_key_file)
    if args.command == "fleet":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_fleet_simulate(args.out, clients=args.clients, rounds=args.rounds, profile=args.profile,
                                  tasks=args.tasks, tasks_per_client=args.tasks_per_client,
                                  examples_per_day=args.examples_per_day, mode=args.mode, nights=not args.no_nights,
                                  payload=args.payload, int8=not args.no_int8, merge=args.merge,
                                  epsilon=args.epsilon, clip=args.clip, seed=args.seed)
    if args.command in ("simulate", "watch") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "simulate":
        return run_simulate(args.profile, args.days, args.out, args.policy, args.seed, args.calibration,
                            args.platform, args.checkpoint_every_s, args.days_from, args.trace, args.tz)
    if args.command == "watch":
        return run_watch(args.checkpoint, args.model, args.policy, args.poll_s, args.min_idle_s, args.polls,
                         mains=args.mains, activity_file=args.activity_file, use_terminals=args.use_terminals,
                         max_cpu_load=args.max_cpu_load)
    if args.command == "profile":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.runs < 1 or args.top < 1:
            parser.error(f"--runs={args.runs}, --top={args.top}; expected integers >= 1")
        return run_profile(args.program, runs=args.runs, batch=args.batch, top=args.top)
    if args.command == "export":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.max_batch < 2:
            parser.error(f"--max-batch={args.max_batch}; expected an integer >= 2")
        return run_export(args.checkpoint, args.out, args.model, int8=not args.no_int8,
                          onnx=not args.no_onnx, max_batch=args.max_batch, etrecord=args.etrecord)
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        for name in ("tasks", "train_per_task", "test_per_task"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected an integer >= 1")
        if args.days < 0:
            parser.error(f"--days={args.days}; expected an integer >= 0")
        from edge_sleep.errors import EdgeSleepError

        try:
            run_demo(args.tasks, args.train_per_task, args.test_per_task, args.seed, args.out, args.profile,
                     args.days)
        except EdgeSleepError as e:
            return _fail("demo", e)
        return 0
    from edge_sleep.bench.pmnist import main as bench_main

    bench_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
