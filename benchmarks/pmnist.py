"""Permuted-MNIST benchmark: ``python benchmarks/pmnist.py`` (see edge_sleep/bench/pmnist.py)."""

from edge_sleep.bench.pmnist import main

if __name__ == "__main__":
    main()
