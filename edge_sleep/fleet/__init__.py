"""The fleet: many phones learning together through Flower, their data staying on each (issue 26).

- :mod:`edge_sleep.fleet.aggregate`: a round's maths as pure functions: checking a client's update
  against the fleet's model, the examples-weighted mean (FedAvg) and the Fisher-weighted mean.
- :mod:`edge_sleep.fleet.apps` (needs ``flwr``: ``pip install "edge-sleep[fleet]"``): a Flower
  ``ClientApp`` around each phone's :class:`edge_sleep.EdgeSleep` runtime (a day, a night, its
  store and anchor kept on the phone) and :class:`~edge_sleep.fleet.apps.CheckedFedAvg`, Flower's
  FedAvg refusing a malformed update. Not yet: the fleet's differential privacy, rounds gated on
  charging, ``edge-sleep fleet simulate`` and its benchmark.
"""

from edge_sleep.fleet.aggregate import check_update, fisher_weighted_mean, weighted_mean

__all__ = ["check_update", "fisher_weighted_mean", "weighted_mean"]
