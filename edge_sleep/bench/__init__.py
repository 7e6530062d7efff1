"""Benchmarks: offline datasets, continual-learning strategies and metrics."""
