"""The fleet: many phones learning together through Flower, their data staying on each (issue 26).

- :mod:`edge_sleep.fleet.aggregate`: a round's maths as pure functions: checking a client's update
  against the fleet's model, the examples-weighted mean (FedAvg) and the Fisher-weighted mean.
- :mod:`edge_sleep.fleet.apps` (needs ``flwr``: ``pip install "edge-sleep[fleet]"``): a Flower
  ``ClientApp`` around each phone's :class:`edge_sleep.EdgeSleep` runtime (a day, a night, its
  store and anchor kept on the phone) and :class:`~edge_sleep.fleet.apps.FleetStrategy`, Flower's
  FedAvg that tells the nodes what to send, refuses a malformed reply and merges the rest;
  :func:`~edge_sleep.fleet.apps.fleet_strategy` wraps it in Flower's differential privacy.
- :mod:`edge_sleep.fleet.payload`: what a node sends (full weights, their change, the change at
  the adapters' size; int8; clipped) and how the server reads it back.
- :mod:`edge_sleep.fleet.privacy`: the budget a fleet promises (:class:`FleetPrivacy`) and what
  its rounds spent (Opacus' RDP accountant).
- :mod:`edge_sleep.fleet.simulate`: a simulated fleet of phones of a device profile, nights and
  rounds when they charge (``edge-sleep fleet simulate``; ``benchmarks/fleet.py``).

Not offered: secure aggregation (Flower has it only for its legacy workflow).
"""

from edge_sleep.fleet.aggregate import check_update, fisher_weighted_mean, weighted_mean

__all__ = ["check_update", "fisher_weighted_mean", "weighted_mean"]
