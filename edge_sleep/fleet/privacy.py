"""The fleet's differential privacy: each node's update clipped on the node, Gaussian noise added
to the average on the server (DP-FedAvg, McMahan et al. 2018), and the ``(epsilon, delta)`` a
node's data has spent over the rounds.

The noise is Flower's (``DifferentialPrivacyClientSideFixedClipping`` wraps the fleet's strategy);
the accounting is Opacus' RDP accountant. The unit protected is a node: everything its data put
into its updates, over all rounds (user-level privacy). The accounting assumes no amplification by
sampling (every round's nodes are not a secret), the same assumption Flower's own accounting makes.

With ``n`` nodes sampled and noise ``z * clip / n`` on their mean, a round whose mean is over
``m < n`` updates (a node dropped or was refused) has sensitivity ``clip / m``, so its effective
noise multiplier is ``z * m / n``; :func:`spent` composes each released round with its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edge_sleep.privacy import rdp_noise_multiplier

__all__ = ["FleetPrivacy", "spent"]


@dataclass(frozen=True)
class FleetPrivacy:
    """The privacy a fleet promises its nodes.

    Attributes:
        epsilon: the budget of a node's data over all ``rounds``.
        delta: its delta (below one over the number of nodes).
        rounds: how many rounds the budget covers (the noise is sized for them).
        clip: the L2 norm a node's update is clipped to (the sensitivity of one node).
    """

    epsilon: float
    delta: float
    rounds: int
    clip: float

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            problems.append(f"epsilon={self.epsilon!r}; expected a finite number > 0")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            problems.append(f"delta={self.delta!r}; expected a float in (0, 1), below 1 / the number of nodes")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            problems.append(f"rounds={self.rounds!r}; expected an int >= 1")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            problems.append(f"clip={self.clip!r}; expected a finite norm > 0")
        if problems:
            raise ValueError("FleetPrivacy: " + "; ".join(problems))

    @property
    def noise_multiplier(self) -> float:
        """``z``: the noise's standard deviation over one node's sensitivity, the smallest for which
        ``rounds`` releases are ``(epsilon, delta)``-DP."""
        return rdp_noise_multiplier(float(self.epsilon), self.delta, releases=self.rounds)


def spent(noise_multipliers: Sequence[float], delta: float) -> float:
    """The epsilon at ``delta`` of releases with these (effective) noise multipliers, one per
    released round; 0 for none.

    Example:
        >>> z = FleetPrivacy(epsilon=8.0, delta=1e-5, rounds=10, clip=1.0).noise_multiplier
        >>> round(spent([z] * 10, 1e-5), 2)
        8.0
    """
    if not noise_multipliers:
        return 0.0
    bad = [z for z in noise_multipliers if not (math.isfinite(z) and z > 0)]
    if bad:
        raise ValueError(f"noise multipliers {bad}; expected finite numbers > 0")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(z), 1.0, 1) for z in noise_multipliers]
    return float(accountant.get_epsilon(delta))
