"""The day simulator: device profiles, a virtual clock, the real wake and sleep code on a day.

- :mod:`edge_sleep.simulate.profiles`: ``device_profiles/*.toml`` read and validated.
- :mod:`edge_sleep.simulate.trace`: a CSV trace of battery, charging and screen events into a day.
- :mod:`edge_sleep.simulate.calibrate`: the reference workload that relates this host to a profile.
- :mod:`edge_sleep.simulate.day`: the simulator (``edge-sleep simulate``).
- :mod:`edge_sleep.simulate.night`: one night window in a child process under the profile's limits.
- :mod:`edge_sleep.simulate.timeline`: the timeline plot.
"""
