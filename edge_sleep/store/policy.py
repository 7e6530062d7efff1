"""Which slot a new record takes (eviction) and which records a replay draws (sampling).

:class:`Slots` is the store's table of occupied slots and their labels, with the free slots
below capacity as a heap. It draws from the generator it is given, so the store's one generator
(kept in its ``state_dict``) decides both eviction and sampling.
"""

from __future__ import annotations

import heapq
from typing import Literal

import numpy as np

__all__ = ["Slots"]


class Slots:
    """Occupied slots and their labels; eviction and sampling over them."""

    def __init__(self) -> None:
        self.labels: dict[int, int] = {}  # slot -> label
        self._free: list[int] | None = None  # a heap of the free slots below capacity (built on demand)

    def __len__(self) -> int:
        return len(self.labels)

    def put(self, slot: int, label: int) -> None:
        self.labels[slot] = label

    def remove(self, slots: list[int]) -> None:
        """Free ``slots`` (deleted records): the next records take them first."""
        for slot in slots:
            if self.labels.pop(slot, None) is not None and self._free is not None:
                heapq.heappush(self._free, slot)

    def snapshot(self) -> tuple[dict[int, int], list[int] | None]:
        """What :meth:`restore` needs to undo a batch's choices (a write that failed)."""
        return dict(self.labels), None if self._free is None else list(self._free)

    def restore(self, snap: tuple[dict[int, int], list[int] | None]) -> None:
        self.labels, self._free = snap[0], snap[1]

    def occupied(self) -> np.ndarray:
        """The occupied slots, sorted ``(n,)`` int64."""
        return np.sort(np.fromiter(self.labels.keys(), dtype=np.int64, count=len(self.labels)))

    def class_counts(self) -> dict[int, int]:
        """``{label: records}``."""
        counts: dict[int, int] = {}
        for lab in self.labels.values():
            counts[lab] = counts.get(lab, 0) + 1
        return counts

    def choose(self, label: int, seen: int, cap: int, eviction: Literal["reservoir", "class_balanced"],
               rng: np.random.Generator) -> int | None:
        """The slot the ``seen``-th record offered (of class ``label``) goes to, or ``None`` to drop
        it; the choice is recorded.

        Below capacity it takes the lowest free slot (holes appear where records were
        quarantined). Then ``"reservoir"`` keeps it with probability ``cap / seen`` in place of
        a uniform victim (uniform over everything ever offered); ``"class_balanced"`` makes room
        by evicting a record of a largest class, unless the new one is of it (then a reservoir
        within its own class).
        """
        slot = self._choose(label, seen, cap, eviction, rng)
        if slot is not None:
            self.labels[slot] = label
        return slot

    def _choose(self, label: int, seen: int, cap: int, eviction: str, rng: np.random.Generator) -> int | None:
        if len(self.labels) < cap:
            if self._free is None:
                self._free = sorted(set(range(cap)) - set(self.labels))  # sorted: already a heap
            return heapq.heappop(self._free)
        if eviction == "reservoir":
            j = int(rng.integers(0, seen))
            return j if j < cap else None
        counts = self.class_counts()
        largest = max(counts.values())
        if counts.get(label, 0) == largest:
            own = [s for s, lab in self.labels.items() if lab == label]
            j = int(rng.integers(0, seen))
            return own[j % len(own)] if j < cap else None
        big = [c for c, k in counts.items() if k == largest]
        victim_class = big[int(rng.integers(0, len(big)))]
        victims = [s for s, lab in self.labels.items() if lab == victim_class]
        return victims[int(rng.integers(0, len(victims)))]

    def sample(self, n: int, rng: np.random.Generator, *, balanced: bool = False,
               exclude: np.ndarray | None = None) -> np.ndarray:
        """``min(n, len(self))`` occupied slots without replacement; ``balanced``: classes
        uniformly first, then records within each class; ``exclude``: slots never drawn."""
        slots_all = np.fromiter(self.labels.keys(), dtype=np.int64)
        labels_all = np.fromiter(self.labels.values(), dtype=np.int64)
        if exclude is not None and len(exclude):
            keep = ~np.isin(slots_all, exclude)
            slots_all, labels_all = slots_all[keep], labels_all[keep]
        k = min(n, slots_all.size)
        if not balanced:
            return rng.choice(slots_all, size=k, replace=False)
        classes, inv, counts = np.unique(labels_all, return_inverse=True, return_counts=True)
        p = 1.0 / (len(classes) * counts[inv])
        return rng.choice(slots_all, size=k, replace=False, p=p / p.sum())
