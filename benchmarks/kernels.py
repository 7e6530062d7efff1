"""The night's consolidation kernel against a copy, ``kthvalue`` and a sort. ``python benchmarks/kernels.py``

For n from 1e5 to 1e8 float32 weights, side by side in one process (torch's default threads; the
kernel uses as many), medians of repeated runs:

- ``kernel_s``: the whole Phase 2 on one tensor, :func:`edge_sleep.kernels.consolidate_` (the
  compiled kernel): significance ``F * w^2``, the exact prune threshold (the 10% of live weights
  with the smallest key ``(s, |w|, index)``), the strengthening threshold (top 1%), prune,
  strengthen and the mask update, in place. The data is shaped like a real night's: ``w`` normal,
  10% already pruned (``w = 0``, mask off), ``F`` heavy-tailed with 15% exact zeros, so the prune
  threshold falls among thousands of weights tied at ``s = 0`` and the kernel must break the ties
  by ``|w|`` (two more passes). ``kernel_noties_s`` is the same on ``F`` without zeros.
- ``copy_s``: ``w.clone()``, the memory-bandwidth floor the issue names. A clone allocates: below
  about 32 MB glibc reuses freed memory, above it every clone maps fresh pages and pays a page
  fault per 4 KiB, so its time per weight jumps with n. ``copy_into_s`` is therefore also
  measured: ``dst.copy_(w)`` into a tensor allocated once, the bandwidth floor without faults.
- ``kthvalue_s``: ``significance`` + ``torch.kthvalue`` (quickselect), the threshold only.
- ``sort_s``: ``significance`` + ``torch.sort`` + index, the threshold only: what pruning libraries do.
- ``previous_s``: the night's Phase 2 before this kernel (``smallest_mask`` + ``kth_smallest`` +
  ``consolidate``), up to 1e7.
- ``radix_torch_s``: the same selection as plain PyTorch tensor operations
  (:func:`edge_sleep.kernels.consolidate_radix`, the form ``consolidate.pte`` runs), up to 1e7.
- ``extra_bytes``: the kernel's peak memory beyond its inputs, measured in a child process as the
  peak resident set during one call minus the resident set before it (so everything counts:
  histograms, thread stacks, allocator slack).

Writes ``benchmarks/results/kernels.json`` (``{"sizes": [...], "targets": {...}}``) and
``kernels.png``. Takes about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edge_sleep import native
from edge_sleep.bench.provenance import provenance
from edge_sleep.memory import ResidentPeak
from edge_sleep.kernels import (consolidate, consolidate_, consolidate_radix, kth_smallest, prune_count,
                                significance, smallest_mask)

RESULTS = Path(__file__).resolve().parent / "results"
PRUNE_FRAC, STRENGTHEN_FRAC, ETA = 0.1, 0.01, 0.1


def night_like(n: int, seed: int = 0, zeros: float = 0.15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, F, mask) built in place, so no temporary raises the process's peak memory."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(n).normal_(0.0, 0.05, generator=g)
    f = torch.empty(n).uniform_(0.0, 1.0, generator=g)
    f.pow_(4)
    if zeros:
        f.masked_fill_(torch.empty(n).uniform_(generator=g) < zeros, 0.0)
    mask = torch.empty(n).uniform_(generator=g) >= 0.1
    w.mul_(mask)
    return w, f, mask


def counts(n: int, mask: torch.Tensor) -> tuple[int, int]:
    k = prune_count(n, int(n - mask.sum()), PRUNE_FRAC, 0.9)
    return k, n - int(STRENGTHEN_FRAC * n)


def median_s(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def child_extra_bytes(n: int) -> None:
    """In a fresh process: the kernel's peak resident memory beyond what was resident before it.

    :class:`edge_sleep.memory.ResidentPeak`: the peak resident set during the call (Linux's
    ``VmHWM``, reset first) minus the resident set before it.
    """
    w, f, mask = night_like(1 << 18, 1)
    consolidate_(w, f, mask, prune=1, strengthen_rank=7, eta=ETA)  # load the library, start the threads
    w, f, mask = night_like(n)
    k, rank = counts(n, mask)
    with ResidentPeak() as peak:
        consolidate_(w, f, mask, prune=k, strengthen_rank=rank, eta=ETA)
    if peak.extra_bytes is None:
        raise SystemExit("this benchmark reads Linux's /proc/self/status and /proc/self/clear_refs")
    print(json.dumps({"extra_bytes": peak.extra_bytes}))


def measure(n: int, repeats: int, controls: bool) -> dict[str, float | int]:
    w, f, mask = night_like(n)
    k, rank = counts(n, mask)
    w0, m0 = w.clone(), mask.clone()

    def restore() -> None:
        w.copy_(w0)
        mask.copy_(m0)

    row: dict[str, float | int] = {"n": n}
    row["kernel_s"] = median_s(lambda: consolidate_(w, f, mask, prune=k, strengthen_rank=rank, eta=ETA),
                               repeats, restore)
    restore()
    assert consolidate_(w, f, mask, prune=k, strengthen_rank=rank, eta=ETA).native
    row["copy_s"] = median_s(w0.clone, repeats)
    dst = torch.empty_like(w0)
    row["copy_into_s"] = median_s(lambda: dst.copy_(w0), repeats)
    del dst
    f_noties = f.clone()
    f_noties[f_noties == 0] = 1e-12
    row["kernel_noties_s"] = median_s(lambda: consolidate_(w, f_noties, mask, prune=k, strengthen_rank=rank,
                                                           eta=ETA), repeats, restore)
    del f_noties
    live = int(m0.sum())
    row["kthvalue_s"] = median_s(lambda: torch.kthvalue(significance(f, w0), k), repeats)
    row["sort_s"] = median_s(lambda: torch.sort(significance(f, w0)).values[k - 1], max(1, repeats // 3))
    if controls:
        def previous() -> None:
            s = significance(f, w0)
            keep = m0 & ~smallest_mask(s, w0, m0, k)
            consolidate(w0, s, keep, strengthen_thr=kth_smallest(s, rank), eta=ETA)

        row["previous_s"] = median_s(previous, max(1, repeats // 3))
        row["radix_torch_s"] = median_s(lambda: consolidate_radix(
            w0, f, m0, torch.tensor(k), torch.tensor(rank), torch.tensor(1 + ETA)), max(1, repeats // 3))
    del live
    out = subprocess.run([sys.executable, __file__, "--child-extra", str(n)], capture_output=True, text=True,
                         check=True)
    row["extra_bytes"] = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
    return row


def _time(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def markdown_table(result: dict) -> str:
    """The table of a ``kernels.json`` result in docs/benchmarks.md."""
    lines = ["| n | kernel, ties | kernel, no ties | `clone` | `copy_` | `kthvalue` | sort | previous Phase 2 "
             "| extra bytes a weight |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["sizes"]:
        prev = _time(r["previous_s"]) if "previous_s" in r else "not run"
        lines.append(f"| {r['n']:,} | {_time(r['kernel_s'])} | {_time(r['kernel_noties_s'])} | {_time(r['copy_s'])} "
                     f"| {_time(r['copy_into_s'])} | {_time(r['kthvalue_s'])} | {_time(r['sort_s'])} | {prev} "
                     f"| {r['extra_bytes'] / r['n']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, float | int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("sort_s", "sort (threshold only)"), ("kthvalue_s", "kthvalue (threshold only)"),
                       ("previous_s", "previous Phase 2 (kthvalue + masks)"),
                       ("radix_torch_s", "radix selection in PyTorch ops"),
                       ("kernel_s", "kernel: whole Phase 2, ties"), ("kernel_noties_s", "kernel: no ties"),
                       ("copy_s", "clone (allocates)"), ("copy_into_s", "copy_ into a tensor (bandwidth floor)")):
        pts = [(r["n"], r[key] / r["n"] * 1e9) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights n (float32)")
    ax.set_ylabel("ns per weight")
    ax.set_title(f"Phase 2 on one tensor, {torch.get_num_threads()} threads (benchmarks/kernels.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 3e6, 1e7, 3e7, 1e8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child-extra", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child_extra:
        child_extra_bytes(args.child_extra)
        return
    if not native.available():
        raise SystemExit(f"the compiled kernel is not available here: {native.unavailable_reason()}")
    rows = []
    for n in (int(s) for s in args.sizes):
        repeats = max(3, args.repeats if n < 5e7 else args.repeats // 2)
        row = measure(n, repeats, controls=n <= 1e7)
        rows.append(row)
        print(f"n={n:>11,}  kernel {row['kernel_s'] * 1e3:9.2f} ms = {row['kernel_s'] / row['copy_s']:5.2f}x clone, "
              f"{row['kernel_s'] / row['copy_into_s']:5.2f}x copy_, "
              f"{row['sort_s'] / row['kernel_s']:6.1f}x faster than sort, "
              f"{row['kthvalue_s'] / row['kernel_s']:5.1f}x than kthvalue; "
              f"{row['kernel_s'] / n * 1e9:5.2f} ns/weight; extra {row['extra_bytes'] / n:6.3f} B/weight", flush=True)
    big = [r for r in rows if r["n"] >= 1e7]
    flat = [r["kernel_s"] / r["n"] for r in rows if 1e6 <= r["n"] <= 1e8]
    targets = {
        "max_kernel_over_copy_at_1e7_plus": max(r["kernel_s"] / r["copy_s"] for r in big) if big else None,
        "max_kernel_over_copy_into_at_1e7_plus": max(r["kernel_s"] / r["copy_into_s"] for r in big) if big else None,
        "min_sort_over_kernel_at_1e7_plus": min(r["sort_s"] / r["kernel_s"] for r in big) if big else None,
        "per_weight_max_over_min_1e6_to_1e8": max(flat) / min(flat) if flat else None,
        "max_extra_bytes_per_weight": max(r["extra_bytes"] / r["n"] for r in rows),
        "threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps({"sizes": rows, "targets": targets, **provenance()},
                                                      indent=2) + "\n")
    plot(rows, args.out / "kernels.png")
    print(json.dumps(targets, indent=2))
    print(markdown_table({"sizes": rows}))


if __name__ == "__main__":
    main()
