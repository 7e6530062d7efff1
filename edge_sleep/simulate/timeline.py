"""The simulator's timeline plot: battery, charging, usage and sleep bands, accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_timeline"]


def _bands(hours: Sequence[float], on: Sequence[bool], step_h: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    start = None
    for h, v in zip(hours, on):
        if v and start is None:
            start = h
        elif not v and start is not None:
            out.append((start, h))
            start = None
    if start is not None and hours:
        out.append((start, hours[-1] + step_h))
    return out


def plot_timeline(
    hours: Sequence[float],
    battery: Sequence[float | None],
    charging: Sequence[bool],
    usage: Sequence[bool],
    nights: Sequence[tuple[float, float, bool]],
    accuracy: Sequence[tuple[float, float]],
    path: Path,
    *,
    title: str = "",
) -> None:
    """Write the timeline: hours on x; bands for charging, usage and sleep; battery and accuracy.

    Args:
        hours: the tick times (hours since the start).
        battery: battery fraction per tick (``None``: mains-powered).
        charging / usage: per tick.
        nights: ``(start_h, end_h, completed)`` of each night window that ran.
        accuracy: ``(hour, average accuracy)`` measured the morning after each night.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = hours[1] - hours[0] if len(hours) > 1 else 1.0
    fig, ax = plt.subplots(figsize=(12, 4.6))
    for a, b in _bands(hours, charging, step):
        ax.axvspan(a, b, ymin=0.0, ymax=0.06, color="tab:green", alpha=0.8, lw=0)
    for a, b in _bands(hours, usage, step):
        ax.axvspan(a, b, color="tab:orange", alpha=0.18, lw=0)
    for a, b, done in nights:  # a night can be seconds long: drawn at least 15 minutes wide, marked on top
        ax.axvspan(a, max(b, a + 0.25), color="tab:purple", alpha=0.45 if done else 0.2, lw=0,
                   hatch=None if done else "//")
        ax.plot([a], [1.0], marker="v", color="tab:purple", ms=7, clip_on=False)
    if any(v is not None for v in battery):
        ax.plot(hours, [float("nan") if v is None else v for v in battery], color="tab:blue", lw=1.5,
                label="battery")
    if accuracy:
        ax.plot([h for h, _ in accuracy], [a for _, a in accuracy], "o-", color="black", lw=1.2,
                label="accuracy (tasks so far)")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(hours[0] if hours else 0, (hours[-1] + step) if hours else 24)
    ax.set_xlabel("hours since the first midnight")
    ax.set_ylabel("fraction")
    ticks = range(0, int((hours[-1] if hours else 24) + step) + 1, 6)
    ax.set_xticks(list(ticks))
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color="tab:orange", alpha=0.3, label="in use (wake learning)"),
                Patch(color="tab:green", label="charging"),
                Patch(color="tab:purple", alpha=0.5, label="sleep (hatched: preempted)")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=5, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
