"""The fleet: many phones learning together through Flower, their data staying on each (issue 26).

Landed so far: the maths of a round, as pure functions (:mod:`edge_sleep.fleet.aggregate`):
checking a client's update against the fleet's model, the examples-weighted mean (FedAvg) and the
Fisher-weighted mean of updates. Flower's ``ClientApp`` and ``ServerApp`` around an
:class:`edge_sleep.EdgeSleep` runtime come next; they call these.
"""

from edge_sleep.fleet.aggregate import check_update, fisher_weighted_mean, weighted_mean

__all__ = ["check_update", "fisher_weighted_mean", "weighted_mean"]
