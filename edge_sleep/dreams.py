"""Differentially private class statistics of the day's latents, and the "dreams" drawn from them
(design.md section 4, "Privacy: two designs"; issue 20).

Noise per record cannot carry a 784-dimensional image at epsilon 8: the noise's norm is tens of
times the clipping norm. Statistics of many records can: a class's clipped sum moves by at most
``2C`` when one example is replaced by another, whatever the class's count ``n``, so the noise
on its mean shrinks as ``2C / n``. The day's latents are accumulated per (stream, class) in
memory (:class:`StatsAccumulator`), and at the start of the night released once, all cells
together, by one Gaussian mechanism on three blocks, each rounded to a grid and noised with the
discrete Gaussian (:func:`edge_sleep.privacy.discrete_gaussian`: integers, so no floating-point
artefact of the noise can reveal what it was added to):

* the counts ``n`` (integers; a replaced example moves two counts by one: sensitivity ``sqrt(2)``);
* the clipped sums ``sum x`` on a grid of ``C / GRID_STEPS`` (sensitivity ``2C``, plus
  ``sqrt(d) / 2`` steps of rounding on either side);
* the sums of outer products ``sum x x^T``, upper triangle, on a grid of ``C^2 / GRID_STEPS``
  (sensitivity ``sqrt(2) C^2``: ``||x x^T - y y^T||_F^2 = |x|^4 + |y|^4 - 2 (x.y)^2 <= 2 C^4``,
  plus the rounding of its ``d (d + 1) / 2`` entries).

Replacing one example moves the released vector, block by block scaled by each block's noise, by
at most ``mu = sqrt(sum_b (sensitivity_b / sigma_b)^2)``, and the Renyi divergences of the whole
release are those of one Gaussian release with noise multiplier ``1 / mu`` (the discrete
Gaussian's are at most the continuous one's). :func:`stats_noise` takes ``1 / mu`` from Opacus' RDP
accountant (:func:`edge_sleep.privacy.rdp_noise_multiplier`), so the release is
``(epsilon, delta)``-DP for each example, its label included (a label only says which cell the
example went to). Everything after the release is post-processing: each class's mean and a
rank-``r`` factor of its covariance (:func:`class_statistics`), and the dreams, samples of
``N(mean, F F^T)`` labelled by their class (:func:`draw_dreams`).

The unit of privacy is one example offered once. ``k`` examples of one person in one release are
protected as by a release with ``k`` times ``mu`` (group privacy), and releases compose (Opacus'
accountant adds their Renyi divergences): statistics protect an example among many, not a
person who gave all of them.

Example:
    >>> from edge_sleep.privacy import compose_gaussian_epsilon
    >>> noise = stats_noise(epsilon=8.0, delta=1e-5, max_norm=1.0, dim=4)
    >>> compose_gaussian_epsilon(1 / noise.mu, 1, 1e-5) <= 8.0
    True
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from edge_sleep.errors import ConfigError, InputError
from edge_sleep.privacy import GRID_STEPS, RecordPrivacy, clip_rows, noised_on_grid, rdp_noise_multiplier

if TYPE_CHECKING:
    from edge_sleep.config import PrivacyConfig
    from edge_sleep.store import ReplayStore

__all__ = ["SHARES", "StatsNoise", "stats_sensitivities", "stats_noise", "StatsAccumulator", "ClassStatistics", "release_statistics",
           "class_statistics", "draw_dreams", "release_dreams", "ACCUMULATOR_MAX_BYTES"]

# each block's share of mu^2, chosen before any benchmark ran: a count needs little (a mean divides
# by it); a class mean's noise is about 1% of its norm at 500 examples even with a fifth of the
# budget (sigma ~ 2C / mu_b over n, times sqrt(d)), while the covariance's noise, spread over
# d^2 / 2 entries, decides which of its directions survive the floor: it gets the rest
SHARES = {"counts": 0.02, "sums": 0.18, "second": 0.80}
ACCUMULATOR_MAX_BYTES = 512 * 2**20  # the second moments of one day, in memory


@dataclass(frozen=True)
class StatsNoise:
    """The noise of one release of class statistics (see the module's docstring).

    Attributes:
        epsilon, delta, max_norm: what it was calibrated to; dim: the latent's size ``d``;
        mu: the release's ``sqrt(sum_b (sensitivity_b / sigma_b)^2)`` (``1 / mu`` is the noise
            multiplier of the equivalent single Gaussian release).
        counts, sums, second: each block's noise standard deviation in the latent's units
            (counts: 1; sums: ``C``; second moments: ``C^2``), rounding included in the sensitivity.
    """

    epsilon: float
    delta: float
    max_norm: float
    dim: int
    mu: float
    counts: float
    sums: float
    second: float

    @property
    def sums_step(self) -> float:
        """The sums' grid step, ``C / GRID_STEPS``."""
        return self.max_norm / GRID_STEPS

    @property
    def second_step(self) -> float:
        """The second moments' grid step, ``C^2 / GRID_STEPS``."""
        return self.max_norm ** 2 / GRID_STEPS


def stats_sensitivities(max_norm: float, dim: int) -> dict[str, float]:
    """Each block's L2 sensitivity in the latent's units, the grids' rounding included."""
    c, d = float(max_norm), int(dim)
    return {"counts": math.sqrt(2.0),
            "sums": 2.0 * c + math.sqrt(d) * c / GRID_STEPS,
            "second": math.sqrt(2.0) * c * c + math.sqrt(d * (d + 1) / 2.0) * c * c / GRID_STEPS}


def stats_noise(epsilon: float, delta: float, max_norm: float, dim: int) -> StatsNoise:
    """The block noises that make one release of class statistics ``(epsilon, delta)``-DP.

    ``1 / mu`` is the noise multiplier Opacus' RDP accountant needs for one Gaussian release at
    ``(epsilon, delta)``; each block ``b`` gets ``mu_b^2 = SHARES[b] * mu^2``, so
    ``sigma_b = sensitivity_b / mu_b`` and the blocks together have the Renyi divergences of that
    one release.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError("class statistics", [f"max_norm={max_norm}; expected a finite number > 0"])
    if dim < 1:
        raise ConfigError("class statistics", [f"dim={dim}; expected >= 1"])
    mu = 1.0 / rdp_noise_multiplier(epsilon, delta)
    sens = stats_sensitivities(max_norm, dim)
    sig = {b: sens[b] / (mu * math.sqrt(SHARES[b])) for b in SHARES}
    return StatsNoise(float(epsilon), float(delta), float(max_norm), int(dim), mu, sig["counts"], sig["sums"],
                      sig["second"])


class StatsAccumulator:
    """The day's clipped latents, summed per (stream, class): counts, sums and second moments.

    Held in memory (and in the runtime's ``state_dict``, like the weights trained on the same
    examples) until :func:`release_statistics` releases them; never written to the store.
    Each day has a random ``release_id``, recorded in the store when its release is written, so a
    day restored from a checkpoint after its release is not released twice.

    Args:
        num_classes: the classes' count ``k``; shape: one latent's shape (``d`` values in all);
            max_norm: the clipping norm ``C``.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], max_norm: float) -> None:
        dim = math.prod(shape)
        need = 4 * num_classes * dim * dim
        if need > ACCUMULATOR_MAX_BYTES:
            raise ConfigError("PrivacyConfig(design='stats')", [
                f"{num_classes} classes of {dim}-dimensional latents need {need / 2**20:.0f} MB of second moments "
                f"per stream; expected at most {ACCUMULATOR_MAX_BYTES / 2**20:.0f} MB. Fix: store a smaller hidden "
                "state with StoreConfig(latent_layer=...), or use design='record'"])
        self.num_classes, self.shape, self.max_norm = int(num_classes), tuple(int(v) for v in shape), float(max_norm)
        self.dim = int(dim)
        self.cells: dict[str, dict[str, torch.Tensor]] = {}
        self.release_id = uuid.uuid4().hex

    @property
    def examples(self) -> int:
        """Examples accumulated since the last release (all streams)."""
        return int(sum(int(c["counts"].sum()) for c in self.cells.values()))

    def __len__(self) -> int:
        return self.examples

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.cells.values() for t in c.values())

    def add(self, latents: torch.Tensor, labels: torch.Tensor, stream: str = "") -> None:
        """Clip each row of ``latents`` ``(B, ...)`` to ``C`` and add it to its (stream, class) cell."""
        x = latents.detach().reshape(latents.shape[0], -1).float().cpu()
        if x.shape[1] != self.dim:
            raise InputError(f"class statistics got latents of {x.shape[1]} values; expected {self.dim} "
                             f"(latents of shape {self.shape}). Fix: keep one latent shape per runtime.")
        y = labels.detach().long().cpu()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise InputError(f"class statistics got labels in [{int(y.min())}, {int(y.max())}]; expected "
                             f"[0, {self.num_classes}). Fix: pass class indices.")
        x = clip_rows(x, self.max_norm)
        # every increment first, then in place: a failure (out of memory) leaves the cell as it was
        per_class = [(c, x[y == c]) for c in torch.unique(y).tolist()]
        steps = [(c, rows.shape[0], rows.double().sum(0), rows.T @ rows) for c, rows in per_class]
        cell = self.cells.get(stream)
        if cell is None:
            k, d = self.num_classes, self.dim
            cell = {"counts": torch.zeros(k, dtype=torch.float64), "sums": torch.zeros(k, d, dtype=torch.float64),
                    "second": torch.zeros(k, d, d, dtype=torch.float32)}
            self.cells[stream] = cell
        for c, n, total, second in steps:
            cell["counts"][c] += n
            cell["sums"][c] += total
            cell["second"][c] += second

    def clear(self) -> None:
        """Forget what was accumulated and start a new day (a new ``release_id``)."""
        self.cells = {}
        self.release_id = uuid.uuid4().hex

    def state_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "shape": list(self.shape), "max_norm": self.max_norm,
                "release_id": self.release_id,
                "cells": {s: {n: t.clone() for n, t in c.items()} for s, c in self.cells.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StatsAccumulator:
        acc = cls(int(state["num_classes"]), tuple(state["shape"]), float(state["max_norm"]))
        k, d = acc.num_classes, acc.dim
        shapes = {"counts": (k,), "sums": (k, d), "second": (k, d, d)}
        for stream, cell in state["cells"].items():
            if set(cell) != set(shapes) or any(tuple(cell[n].shape) != shapes[n] for n in shapes):
                raise InputError(f"class statistics state of stream {stream!r} has blocks "
                                 f"{ {n: tuple(t.shape) for n, t in cell.items()} }; expected {shapes}. "
                                 "Fix: load the state_dict this runtime saved.")
        acc.cells = {s: {n: t.clone() for n, t in c.items()} for s, c in state["cells"].items()}
        acc.release_id = str(state["release_id"])
        return acc


@dataclass(frozen=True)
class ClassStatistics:
    """One (stream, class) cell after its release: what dreams are drawn from.

    Attributes:
        stream, label: the cell; count: its noised count (may be fractional or below 1);
        mean: ``(d,)``; factor: ``(d, r)``, the covariance's top ``r`` eigenvectors scaled by the
            square roots of their (positive) eigenvalues, so ``F F^T`` approximates the covariance.
    """

    stream: str
    label: int
    count: float
    mean: torch.Tensor
    factor: torch.Tensor


def class_statistics(stream: str, label: int, count: float, total: torch.Tensor, second: torch.Tensor,
                     rank: int, second_noise: float = 0.0) -> ClassStatistics | None:
    """Mean and rank-``rank`` covariance factor from one cell's noised count, sum and second
    moment (post-processing); ``None`` when the noised count is below 1.

    ``second_noise``, the noise's standard deviation on the second moment's entries, sets a floor:
    a symmetric ``d x d`` matrix of such noise has eigenvalues up to about ``2 sqrt(d)`` times it,
    so each eigenvalue of the covariance is lowered by ``2 sqrt(d) second_noise / count`` (and kept
    at least 0): what the noise alone would have made of it is not sampled.
    """
    if count < 1.0:
        return None
    mean = total / count
    cov = second.double() / count - torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    floor = 2.0 * math.sqrt(cov.shape[0]) * second_noise / count
    top = (values[-rank:] - floor).clamp_min(0.0)
    factor = vectors[:, -rank:] * top.sqrt()
    return ClassStatistics(stream, int(label), float(count), mean.float(), factor.float())


def release_statistics(acc: StatsAccumulator, noise: StatsNoise, rank: int,
                       generator: torch.Generator | None = None) -> list[ClassStatistics]:
    """Release every cell of ``acc`` once, with ``noise`` (one ``(epsilon, delta)``-DP release),
    and post-process each class into a mean and a covariance factor of rank ``rank``.

    Noise from ``os.urandom`` unless ``generator`` (tests; warns).
    """
    if abs(noise.max_norm - acc.max_norm) > 1e-12 * acc.max_norm or noise.dim != acc.dim:
        raise ConfigError("class statistics", [f"noise calibrated for max_norm={noise.max_norm}, dim={noise.dim}; "
                                               f"accumulated with max_norm={acc.max_norm}, dim={acc.dim}; expected "
                                               "the same clipping norm and latent size"])
    if not 1 <= rank <= acc.dim:
        raise ConfigError("class statistics", [f"rank={rank}; expected 1 <= rank <= {acc.dim}"])
    out: list[ClassStatistics] = []
    k, d = acc.num_classes, acc.dim
    upper = torch.triu_indices(d, d)
    for stream in sorted(acc.cells):
        cell = acc.cells[stream]
        counts = noised_on_grid(cell["counts"], 1.0, noise.counts, generator)
        sums = noised_on_grid(cell["sums"], noise.sums_step, noise.sums / noise.sums_step, generator)
        for c in range(k):
            tri = torch.zeros(d, d, dtype=torch.float64)
            tri[upper[0], upper[1]] = noised_on_grid(cell["second"][c][upper[0], upper[1]], noise.second_step,
                                                     noise.second / noise.second_step, generator)
            second = tri + torch.triu(tri, 1).T  # the released upper triangle, mirrored
            stats = class_statistics(stream, c, float(counts[c]), sums[c], second, rank, noise.second)
            if stats is not None:
                out.append(stats)
    return out


def draw_dreams(stats: ClassStatistics, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples ``(n, d)`` float32 of ``N(mean, F F^T)`` (post-processing of the release:
    any generator is fine, and a seeded one keeps the night repeatable)."""
    z = torch.randn(n, stats.factor.shape[1], generator=generator)
    return stats.mean + z @ stats.factor.T


def release_dreams(acc: StatsAccumulator, config: PrivacyConfig, store: ReplayStore,
                   logits: Callable[[torch.Tensor], torch.Tensor] | None, generator: torch.Generator,
                   noise_generator: torch.Generator | None = None, chunk: int = 4096, offer: int = 64) -> int:
    """Release ``acc`` once and offer the store one dream per released example; returns the dreams offered.

    The release is recorded in the store (:meth:`ReplayStore.record_release`) before any dream is
    written, and ``acc`` is cleared: a crash in between loses that night's dreams but never
    releases the same day twice. Each class gets ``round(noised count)`` dreams, drawn in a
    shuffled order in chunks of ``chunk`` and offered ``offer`` at a time, labelled by their class, with ``logits(dreams)`` (the
    start-of-night weights) as their distillation targets, and the release's parameters as their
    :class:`~edge_sleep.privacy.RecordPrivacy` (``sigma=None``: a dream).

    Args:
        acc: the day's statistics (not empty); config: ``design="stats"`` with ``epsilon``.
        store: where dreams go; logits: the model's logits of latents, or ``None`` to store none.
        generator: draws the dreams and their order (post-processing: a seeded one is fine);
        noise_generator: the release's noise, ``None`` for ``os.urandom`` (else tests; warns).
    """
    assert config.epsilon is not None and config.design == "stats"
    if store.released(acc.release_id):  # a day restored from a checkpoint taken before its release
        acc.clear()
        return 0
    noise = stats_noise(config.epsilon, config.delta, config.max_norm, acc.dim)
    released = release_statistics(acc, noise, min(config.rank, acc.dim), noise_generator)
    store.record_release(acc.release_id, {"epsilon": noise.epsilon, "delta": noise.delta,
                                          "max_norm": noise.max_norm, "mu": noise.mu, "rank": config.rank})
    shape = acc.shape
    acc.clear()
    per_stream: dict[str, list[ClassStatistics]] = {}
    for st in released:
        per_stream.setdefault(st.stream, []).append(st)
    privacy = RecordPrivacy(noise.epsilon, noise.delta, noise.max_norm, None, None)
    offered = 0
    for stream, cells in per_stream.items():
        which = torch.cat([torch.full((round(st.count),), i, dtype=torch.int64) for i, st in enumerate(cells)])
        which = which[torch.randperm(which.numel(), generator=generator)]
        for start in range(0, which.numel(), chunk):
            part = which[start:start + chunk]
            x = torch.empty(part.numel(), acc.dim)
            for i in torch.unique(part).tolist():
                rows = part == i
                x[rows] = draw_dreams(cells[i], int(rows.sum()), generator)
            x = x.reshape(part.numel(), *shape)
            y = torch.tensor([cells[i].label for i in part.tolist()], dtype=torch.int64)
            targets = None if logits is None else logits(x)
            for j in range(0, part.numel(), offer):  # small appends: each is one transaction in the log
                store.offer(x[j:j + offer], y[j:j + offer], None if targets is None else targets[j:j + offer],
                            stream=stream, privacy=privacy)
            offered += part.numel()
    return offered
