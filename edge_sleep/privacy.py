"""Per-record differential privacy for the replay store: clipping, Gaussian mechanisms (the
analytic calibration, and the discrete Gaussian on a grid that stored records use), k-ary
randomized response, and noise from a cryptographically secure source (pure).

A stored record is one release of one example. Its latent ``x`` (a row of ``d`` floats) is
clipped to L2 norm ``C`` (so replacing the example moves the clipped row by at most ``2C``: the
sensitivity is ``2C`` under replacement), put on a grid of step ``C / GRID_STEPS`` (rounding moves
a row by at most ``sqrt(d) / 2`` steps, so the sensitivity in steps is ``2 GRID_STEPS + sqrt(d)``),
and gets discrete Gaussian noise (Canonne, Kamath and Steinke 2020, "The Discrete Gaussian for
Differential Privacy", Algorithm 3) on that grid: integers, so no floating-point artefact of the
noise can leak the value it was added to (Mironov 2012's attack on float noise). The noise's
scale, ``z`` times the sensitivity, is the smallest ``z`` for which Opacus' RDP accountant gives
``(epsilon, delta)`` for one release (:func:`rdp_noise_multiplier`; the discrete Gaussian's Renyi
divergences are at most the continuous one's, CKS 2020 section 4). Labels may go through k-ary
randomized response, ``epsilon``-DP on its own: keep the label with probability
``e^eps / (e^eps + k - 1)``, else report one of the other ``k - 1`` uniformly.

:func:`analytic_gaussian_sigma` is the exact condition of Balle and Wang (2018, "Improving the
Gaussian Mechanism for Differential Privacy", Theorem 8) for the continuous Gaussian

    Phi(D / (2 s) - eps * s / D) - exp(eps) * Phi(-D / (2 s) - eps * s / D) <= delta

(tighter than the classic ``sigma = D * sqrt(2 ln(1.25 / delta)) / eps``, which holds only for
``eps < 1``); the per-class design (:mod:`edge_sleep.dreams`) releases float statistics with it.

Noise comes from the operating system's CSPRNG (``os.urandom``, stretched by AES-256 in counter
mode for large draws) unless a ``torch.Generator`` is passed: that deterministic mode is for tests, and says so with a :class:`DeterministicNoiseWarning`.

Example:
    >>> sigma = analytic_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=1.0)
    >>> round(sigma, 3), sigma < classic_gaussian_sigma(1.0, 1e-5, 1.0)
    (3.731, True)
    >>> gaussian_delta(sigma, 1.0, 1.0) <= 1e-5
    True
    >>> z = rdp_noise_multiplier(8.0, 1e-5)
    >>> compose_gaussian_epsilon(z, 1, 1e-5) <= 8.0
    True
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_sleep.config import PrivacyConfig
from edge_sleep.errors import ConfigError

__all__ = [
    "DeterministicNoiseWarning",
    "delta_problem",
    "gaussian_delta",
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "clip_rows",
    "noised_on_grid",
    "GRID_STEPS",
    "rdp_noise_multiplier",
    "discrete_gaussian",
    "secure_normal",
    "rr_keep_probability",
    "randomized_response",
    "RecordPrivacy",
    "record_privacy",
    "privatize",
    "PrivacyReport",
    "summarize_privacy",
    "compose_gaussian_epsilon",
]


class DeterministicNoiseWarning(UserWarning):
    """Privacy noise drawn from a seeded generator: repeatable, so not private. Tests only."""


def _phi(x: float) -> float:
    """The standard normal CDF, accurate in both tails."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest ``delta`` for which ``N(0, sigma^2)`` noise is ``(epsilon, delta)``-DP.

    Args:
        sigma: the noise's standard deviation (> 0).
        epsilon: the privacy loss bound (>= 0).
        sensitivity: the L2 sensitivity of the released vector (> 0).
    """
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # exp(eps) * Phi(-a - b) underflows gracefully; the difference is >= 0 up to rounding
    return max(0.0, _phi(a - b) - math.exp(epsilon) * _phi(-a - b))


def _check(epsilon: float, delta: float, sensitivity: float) -> None:
    problems = []
    if not (math.isfinite(epsilon) and epsilon > 0):
        problems.append(f"epsilon={epsilon}; expected a finite number > 0")
    if not 0 < delta < 1:
        problems.append(f"delta={delta}; expected 0 < delta < 1 (typically below 1 / the number of records)")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        problems.append(f"sensitivity={sensitivity}; expected a finite number > 0")
    if problems:
        raise ConfigError("Gaussian mechanism", problems)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float, *, tol: float = 1e-12) -> float:
    """The smallest ``sigma`` that makes the Gaussian mechanism ``(epsilon, delta)``-DP (exact).

    ``gaussian_delta`` decreases in ``sigma``; bisection on it to relative precision ``tol``.

    Raises:
        ConfigError: ``epsilon <= 0``, ``delta`` outside ``(0, 1)`` or ``sensitivity <= 0``.
    """
    _check(epsilon, delta, sensitivity)
    lo, hi = 1e-12 * sensitivity, sensitivity
    while gaussian_delta(hi, epsilon, sensitivity) > delta:
        lo, hi = hi, hi * 2.0
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, epsilon, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork and Roth's ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` (valid for epsilon < 1)."""
    _check(epsilon, delta, sensitivity)
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row of ``x`` ``(B, d)`` scaled down to L2 norm at most ``max_norm`` (a new tensor).

    >>> clip_rows(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])
    """
    if not max_norm > 0:
        raise ConfigError("clip_rows", [f"max_norm={max_norm}; expected > 0"])
    norms = torch.linalg.vector_norm(x.float(), dim=1, keepdim=True)
    scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    return (x.float() * scale).to(x.dtype)


GRID_STEPS = 4096  # a stored record's noise lives on a grid of C / GRID_STEPS
_RDP_ORDERS = [1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + \
    [64.0 * 1.25 ** k for k in range(30)]  # Opacus' default orders, extended upward for large epsilons


def rdp_noise_multiplier(epsilon: float, delta: float, *, releases: int = 1, tol: float = 1e-6) -> float:
    """The smallest noise multiplier ``z`` (noise over sensitivity) for which Opacus' RDP accountant
    says ``releases`` Gaussian releases of one person's data (one by default) are together
    ``(epsilon, delta)``-DP (bisection, relative precision ``tol``)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    _check(epsilon, delta, 1.0)
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 1:
        raise ValueError(f"releases={releases!r}; expected an int >= 1")

    def eps_of(z: float) -> float:
        rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=releases, orders=_RDP_ORDERS)
        return float(get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)[0])

    lo, hi = 1e-3, 1.0
    while eps_of(hi) > epsilon:
        lo, hi = hi, hi * 2.0
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if eps_of(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def discrete_gaussian(shape: tuple[int, ...], sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer samples ``(shape)`` int64 of the discrete Gaussian ``N_Z(0, sigma^2)``:
    ``P[k] ~ exp(-k^2 / (2 sigma^2))`` on the integers.

    Canonne, Kamath and Steinke (2020), Algorithm 3, vectorised: a discrete Laplace proposal of
    scale ``t = floor(sigma) + 1`` (a geometric magnitude and a sign, ``-0`` rejected), accepted
    with probability ``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``. Uniforms from ``os.urandom``
    unless ``generator`` (tests; warns). The acceptance test is in float64: the output is an
    integer, so the rounding can only bias a probability by about 1e-16, never reveal a value.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError("discrete_gaussian", [f"sigma={sigma}; expected a finite number > 0"])
    n = math.prod(shape)
    t = math.floor(sigma) + 1
    s2 = sigma * sigma
    if generator is not None:
        warnings.warn("privacy noise from a seeded torch.Generator is repeatable and gives no privacy; "
                      "use it only in tests (pass no generator for noise from os.urandom)",
                      DeterministicNoiseWarning, stacklevel=2)
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        m = int(1.4 * (n - out.size)) + 64  # about 3 in 4 proposals are accepted
        if generator is None:
            u = _secure_uniform(3, m)
        else:
            u = torch.rand(3, m, generator=generator, dtype=torch.float64).clamp_min(2.0 ** -60).numpy()
        magnitude = np.floor(-t * np.log(u[0])).astype(np.int64)  # geometric: P[>= k] = exp(-k / t)
        negative = u[1] < 0.5
        y = np.where(negative, -magnitude, magnitude)
        keep = ~(negative & (magnitude == 0)) & (u[2] < np.exp(-((np.abs(y) - s2 / t) ** 2) / (2.0 * s2)))
        out = np.concatenate([out, y[keep]])
    return torch.from_numpy(out[:n].copy()).reshape(shape)


def _secure_bytes(n: int) -> bytes:
    """``n`` bytes from a cryptographically secure generator: AES-256 in counter mode under a key
    and nonce fresh from ``os.urandom`` (the construction of NIST SP 800-90A's CTR_DRBG, without
    reseeding within a call), several times faster than ``os.urandom`` for the megabytes a batch
    of noise takes."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if n <= 4096:
        return os.urandom(n)
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    return encryptor.update(bytes(n)) + encryptor.finalize()


def _secure_uniform(*shape: int) -> np.ndarray:
    """Uniform float64 samples in ``(0, 1)`` (never 0) from :func:`_secure_bytes`, 53 random bits each."""
    raw = np.frombuffer(_secure_bytes(8 * math.prod(shape)), dtype=np.uint64).reshape(shape)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def secure_normal(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 samples from ``os.urandom`` (Box-Muller on 53-bit uniforms)."""
    n = math.prod(shape)
    pairs = (n + 1) // 2
    u = _secure_uniform(pairs, 2)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    theta = 2.0 * np.pi * u[:, 1]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:n]
    return torch.from_numpy(z.astype(np.float32)).reshape(shape)


def rr_keep_probability(epsilon: float, num_classes: int) -> float:
    """Probability that k-ary randomized response keeps the true label: ``e^eps / (e^eps + k - 1)``."""
    if not (math.isfinite(epsilon) and epsilon > 0) or num_classes < 2:
        raise ConfigError("randomized response", [f"epsilon={epsilon}, num_classes={num_classes}; expected "
                                                  "epsilon > 0 and at least 2 classes"])
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(labels: torch.Tensor, num_classes: int, epsilon: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """k-ary randomized response on ``labels`` ``(B,)`` int64: ``epsilon``-DP per label.

    Each label is kept with :func:`rr_keep_probability`, else replaced by one of the other
    ``num_classes - 1`` classes uniformly. Randomness from ``os.urandom`` unless ``generator``.
    """
    p_keep = rr_keep_probability(epsilon, num_classes)
    b = labels.shape[0]
    if generator is None:
        u01 = _secure_uniform(b, 2)
        u = torch.from_numpy(u01[:, 0])
        # a uniform choice among the other k - 1 classes
        shift = torch.from_numpy(np.minimum((u01[:, 1] * (num_classes - 1)).astype(np.int64), num_classes - 2)) + 1
    else:
        warnings.warn("randomized response from a seeded torch.Generator gives no privacy; tests only",
                      DeterministicNoiseWarning, stacklevel=2)
        u = torch.rand(b, generator=generator, dtype=torch.float64)
        shift = torch.randint(1, num_classes, (b,), generator=generator)
    flipped = (labels.long() + shift) % num_classes  # uniform over the other k - 1 classes
    return torch.where(u < p_keep, labels.long(), flipped)


@dataclass(frozen=True)
class RecordPrivacy:
    """What one record was written with (kept in the record's row). ``None``: not applied.

    Attributes:
        epsilon, delta: the latent's guarantee; max_norm: the clipping norm ``C``; sigma: the
            noise's scale at sensitivity ``2C``, ``z * 2C`` with ``z`` the noise multiplier (the
            discrete noise per coordinate is ``sigma * (1 + sqrt(d) / (2 GRID_STEPS))``, rounding
            included); label_epsilon: randomized response's.

    A record with ``epsilon`` set and no ``sigma`` is a dream (:mod:`edge_sleep.dreams`): drawn
    from class statistics released ``(epsilon, delta)``-DP, latent and label together.
    """

    epsilon: float | None = None
    delta: float | None = None
    max_norm: float | None = None
    sigma: float | None = None
    label_epsilon: float | None = None

    @property
    def design(self) -> str:
        """``"record"`` (a noised latent), ``"stats"`` (a dream) or ``"none"`` (no noise on the latent)."""
        if self.sigma is not None:
            return "record"
        return "none" if self.epsilon is None else "stats"


def record_privacy(config: PrivacyConfig) -> RecordPrivacy:
    """The mechanism ``config`` asks for: ``sigma = z * 2 * max_norm``, with ``z`` the noise
    multiplier Opacus' RDP accountant needs for one release at ``(epsilon, delta)``
    (:func:`rdp_noise_multiplier`; sensitivity ``2 * max_norm``: one example replaced by any other)."""
    if config.epsilon is None:
        return RecordPrivacy(label_epsilon=config.label_epsilon)
    sigma = rdp_noise_multiplier(config.epsilon, config.delta) * 2.0 * config.max_norm
    return RecordPrivacy(config.epsilon, config.delta, config.max_norm, sigma, config.label_epsilon)


def delta_problem(delta: float, records: int) -> str:
    """Why ``delta`` is too large for a store of ``records`` records (``delta * records >= 1``)."""
    return (f"delta={delta:g} with a store of {records} records; expected delta below 1/{records} = "
            f"{1 / records:.3g}: each record may leak outright with probability delta, so at 1/n one of n "
            "records is expected to. Fix: PrivacyConfig(delta=1e-5) or smaller")


def noised_on_grid(values: torch.Tensor, step: float, steps_sigma: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``values`` rounded to the grid of ``step``, plus discrete Gaussian noise of ``steps_sigma``
    grid steps, as float64 in ``values``' units: a function of the noised integers only.

    Both designs release through it: each stored record (:func:`privatize`) and the per-class
    statistics (:mod:`edge_sleep.dreams`).
    """
    grid = torch.round(values.double() / step).long()
    return (grid + discrete_gaussian(tuple(grid.shape), steps_sigma, generator)).double() * step


def privatize(
    latents: torch.Tensor,
    labels: torch.Tensor,
    config: PrivacyConfig,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RecordPrivacy]:
    """Clip and noise each latent row, randomize each label, as ``config`` asks.

    Each row is clipped to L2 norm ``C = max_norm``, rounded to the grid of step
    ``C / GRID_STEPS``, gets discrete Gaussian noise on that grid (``z`` times the grid's
    sensitivity ``2 GRID_STEPS + sqrt(d)``), and is projected back onto the ball of radius ``C``
    (post-processing: it changes nothing in the guarantee, and keeps a stored record the size of a
    real one). What is stored is a function of the noised integers only.

    Args:
        latents: ``(N, ...)`` float; each record flattened is one row.
        labels: ``(N,)`` int64.
        config: the mechanism's parameters.
        num_classes: ``k`` of randomized response.
        generator: a seeded generator (tests; warns), else noise from ``os.urandom``.

    Returns:
        ``(latents', labels', RecordPrivacy)``, new tensors of the same shapes on the same device.

    Raises:
        ConfigError: integer latents (token ids) with ``epsilon`` set: noise needs a float latent
            (store a hidden state with ``StoreConfig(latent_layer=...)``).
    """
    params = record_privacy(config)
    out_x, out_y = latents, labels
    if params.sigma is not None:
        if not latents.is_floating_point():
            raise ConfigError("PrivacyConfig", [
                f"epsilon={config.epsilon} with integer latents ({latents.dtype}); expected float latents to "
                "noise. Fix: store a float hidden state with StoreConfig(latent_layer=...), or set epsilon=None"])
        n, c = latents.shape[0], params.max_norm or 1.0
        flat = clip_rows(latents.detach().reshape(n, -1).float().cpu(), c)
        z = params.sigma / (2.0 * c)  # |rounding| <= 1/2 step a coordinate: sensitivity 2 G + sqrt(d) steps
        noised = noised_on_grid(flat, c / GRID_STEPS, z * (2.0 * GRID_STEPS + math.sqrt(flat.shape[1])), generator)
        # projected back onto the ball of radius C: post-processing, so the guarantee is unchanged,
        # and a stored record is never larger than a real one (noise of norm ~ sigma * sqrt(d)
        # would otherwise make replay's gradients explode)
        flat = clip_rows(noised.float(), c)
        out_x = flat.reshape(latents.shape).to(device=latents.device, dtype=latents.dtype)
    if params.label_epsilon is not None:
        out_y = randomized_response(labels.cpu(), num_classes, params.label_epsilon, generator).to(labels.device)
    return out_x, out_y, params


def compose_gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian releases of one person's data, each with noise
    ``noise_multiplier`` times the sensitivity, at ``delta``: Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, releases)]
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class PrivacyReport:
    """What the store's records are protected by, in numbers (see :meth:`text`).

    Attributes:
        records: records held; private: of them, with a noised latent; labels_randomized: with
            randomized labels; unprotected: with neither.
        epsilon, delta: the largest per-record (epsilon, delta) of a noised latent (``None``
            if none is noised); label_epsilon: the largest randomized response's epsilon.
        record_epsilon: latent and label together (basic composition: the sum).
        max_norm, sigma: the mechanism's clipping norm and noise (of the largest epsilon).
        per_stream: stream tag -> ``(records, epsilon)``: the epsilon at ``delta`` of all the
            stream's records together, if one person contributed them all (Opacus' RDP
            accountant for the latents, plus the labels' epsilons summed).
        dreams: records drawn from released class statistics; stats_epsilon, stats_delta: the
            largest (epsilon, delta) of the releases they were drawn from.
    """

    records: int
    private: int
    labels_randomized: int
    unprotected: int
    epsilon: float | None
    delta: float | None
    label_epsilon: float | None
    record_epsilon: float | None
    max_norm: float | None
    sigma: float | None
    per_stream: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    dreams: int = 0
    stats_epsilon: float | None = None
    stats_delta: float | None = None

    def text(self) -> str:
        """The guarantee in words."""
        if self.records == 0:
            return "The replay store holds no records."
        lines = [f"The replay store holds {self.records} records."]
        if self.dreams:
            lines.append(
                f"{self.dreams} are dreams: samples drawn from per-class statistics of the latents (counts, clipped "
                f"sums and second moments, each example clipped to L2 norm {self.max_norm:g}), released once per "
                f"night by the Gaussian mechanism, ({self.stats_epsilon:g}, {self.stats_delta:g})-DP for each "
                f"example offered that day, its label included. No dream is any one example; their logits come "
                "from the start-of-night weights. The unit is one example: k examples of one person in one "
                "release are protected k times less (group privacy), and nights compose.")
        if self.private:
            lines.append(
                f"{self.private} have a differentially private latent: clipped to L2 norm {self.max_norm:g} and "
                f"noised with discrete Gaussian noise on a grid of {self.max_norm:g}/{GRID_STEPS}, noise multiplier "
                f"{(self.sigma or 0.0) / (2 * (self.max_norm or 1.0)):.4g} (Opacus' RDP accountant), so "
                f"each latent is ({self.epsilon:g}, {self.delta:g})-DP{self._raw_labels()}: whether or not a given "
                f"example was stored changes the probability of anything learned from its latent by a factor of at "
                f"most e^{self.epsilon:g}, except with probability {self.delta:g}.")
        if self.labels_randomized:
            lines.append(f"{self.labels_randomized} have their label through k-ary randomized response "
                         f"({self.label_epsilon:g}-DP).")
        if self.record_epsilon is not None and self.private and self.labels_randomized:
            lines.append(f"A whole record (latent and label) is ({self.record_epsilon:g}, {self.delta:g})-DP.")
        if self.unprotected:
            lines.append(f"{self.unprotected} records are stored without any privacy mechanism.")
        for stream, (count, eps) in sorted(self.per_stream.items()):
            if eps is not None and count > 1:
                lines.append(f"Stream {stream!r}: {count} records; if one person gave them all, together they are "
                             f"({eps:.3g}, {self.delta:g})-DP for that person (Opacus RDP accountant).")
        covered = ("the noised latents, the logits stored with them (computed from the noised latent by the "
                   "weights before the step that trained on the raw batch)"
                   + (", and the randomized labels" if self.labels_randomized else ""))
        if self.dreams and not self.private:
            covered = "the dreams' latents and labels"
        lines.append(f"The guarantee covers {covered}. It does not cover labels stored as they are, which record "
                     "sits in which slot, or the model's weights, which were trained on the raw examples.")
        return "\n".join(lines)

    def _raw_labels(self) -> str:
        """The clause, beside the epsilon, that says which private records' labels are public."""
        raw = self.private - min(self.labels_randomized, self.private)
        if not raw:
            return ""
        which = "their labels are" if raw == self.private else f"the labels of {raw} of them are"
        return f" while {which} stored as they are (public: no epsilon covers them)"

    def __str__(self) -> str:
        return self.text()


def summarize_privacy(rows: Iterable[tuple[RecordPrivacy, str, int]]) -> PrivacyReport:
    """A :class:`PrivacyReport` from ``(params, stream, count)`` groups of records."""
    groups = list(rows)
    records = sum(c for _, _, c in groups)
    private = sum(c for p, _, c in groups if p.sigma is not None)
    labels = sum(c for p, _, c in groups if p.label_epsilon is not None)
    unprotected = sum(c for p, _, c in groups if p.design == "none" and p.label_epsilon is None)
    dreamt = [(p, c) for p, _, c in groups if p.design == "stats"]
    stats_worst = max((p for p, _ in dreamt), key=lambda p: p.epsilon or 0.0, default=None)
    noised = [p for p, _, _ in groups if p.sigma is not None]
    worst = max(noised, key=lambda p: p.epsilon or 0.0) if noised else None
    label_eps = max((p.label_epsilon for p, _, _ in groups if p.label_epsilon is not None), default=None)
    record_eps = None
    if worst is not None or label_eps is not None:
        record_eps = (worst.epsilon if worst is not None and worst.epsilon is not None else 0.0) + (label_eps or 0.0)
    per_stream: dict[str, tuple[int, float | None]] = {}
    for stream in sorted({s for _, s, _ in groups}):
        mine = [(p, c) for p, s, c in groups if s == stream]
        count = sum(c for _, c in mine)
        eps: float | None = None
        if worst is not None and all(p.sigma is not None for p, _ in mine):
            # the least noise among the stream's records bounds them all
            z = min((p.sigma or 0.0) / (2.0 * (p.max_norm or 1.0)) for p, _ in mine)
            eps = compose_gaussian_epsilon(z, count, worst.delta or 1e-5)
            eps += sum((p.label_epsilon or 0.0) * c for p, c in mine)
        per_stream[stream] = (count, eps)
    clip = worst if worst is not None else stats_worst
    return PrivacyReport(records, private, labels, unprotected,
                         None if worst is None else worst.epsilon, None if worst is None else worst.delta,
                         label_eps, record_eps, None if clip is None else clip.max_norm,
                         None if worst is None else worst.sigma, per_stream,
                         dreams=sum(c for _, c in dreamt),
                         stats_epsilon=None if stats_worst is None else stats_worst.epsilon,
                         stats_delta=None if stats_worst is None else stats_worst.delta)
