"""Training batches grouped by set: a seeded order of whole sets, packed into static group slots epoch after epoch.

`grouped.py` packs a split once, in file order, for evaluation. Training needs the same layout (`grouped.Layout`:
set slots and description slots per data shard) over a shuffled, repeated stream, resumable at any batch:

1. epoch e orders the sets by a permutation drawn from (data.seed, e) (file order when not shuffled);
2. the sets are laid into groups one after another, across epoch boundaries, as batches of descriptions
   already run across them: a group closes when its description slots are full or its set slots are; a set
   with more descriptions than the group has left is split, the rest opening the next group (encoded once
   in each). So a group is full unless its set slots ran out first: those slots are padding (target -1),
   which the loss masks;
3. global group i is a pure function of (data, seed, i): the plan is extended lazily, epoch by epoch, and
   grain's iterator state (the next index) resumes it exactly.

Every description comes once per epoch. An epoch of the schedule stays `examples_per_epoch // batch_size`
steps; a data epoch lasts a few more steps when padding occurs (`padding_share` measures how many).

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from contextblip_jax.data.grouped import Chunk, Layout

_ENDLESS = 2**60
"""The length of a plan repeated forever: grain needs one, and its slices and batches compute with it."""


class SetGroups:
    """The training plan as a random-access grain source: element i is global group i (a list of chunks).

    `sets`: each set's example ids (`grouped.set_members`); `num_epochs` None repeats forever. The plan of
    epoch e depends only on the packing left over from epoch e - 1, so every process (and every grain worker,
    each with its own copy) extends the same plan."""

    def __init__(
        self, sets: Sequence[Chunk], layout: Layout, seed: int, shuffle: bool = True, num_epochs: int | None = None
    ):
        if not sets:
            raise ValueError("no training sets to group")
        self.sets, self.layout, self.seed, self.shuffle, self.num_epochs = list(sets), layout, seed, shuffle, num_epochs
        self._groups: list[list[Chunk]] = []
        self._open: list[Chunk] = []
        self._used = 0
        self._epochs = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _full(self) -> bool:
        return len(self._open) == self.layout.set_slots or self._used == self.layout.description_slots

    def _close(self) -> None:
        self._groups.append(self._open)
        self._open, self._used = [], 0

    def _extend(self) -> None:
        """Lays out one more epoch."""
        order = np.arange(len(self.sets))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epochs]).permutation(len(self.sets))
        for index in order.tolist():
            ids = self.sets[index]
            while ids:
                if self._full():
                    self._close()
                take = ids[: self.layout.description_slots - self._used]
                self._open.append(take)
                self._used += len(take)
                ids = ids[len(take) :]
        self._epochs += 1

    def epoch_groups(self, epochs: int) -> int:
        """Groups closed once at least `epochs` epochs are laid out (the open group counted when no epoch
        follows)."""
        with self._lock:
            while self._epochs < epochs:
                self._extend()
            return len(self._groups) + (1 if self._open and self._epochs == self.num_epochs else 0)

    def __len__(self) -> int:
        """Whole global batches only (`layout.groups` groups each), as training drops an incomplete last batch."""
        if self.num_epochs is None:
            return _ENDLESS // self.layout.groups * self.layout.groups
        return self.epoch_groups(self.num_epochs) // self.layout.groups * self.layout.groups

    def __getitem__(self, index: int) -> list[Chunk]:
        with self._lock:
            while len(self._groups) <= index:
                if self._epochs != self.num_epochs:
                    self._extend()
                elif self._open:
                    self._close()
                else:
                    raise IndexError(f"group {index} is past the plan's {len(self._groups)} groups")
            return self._groups[index]


def padding_share(groups: SetGroups, epochs: int = 1) -> float:
    """The share of description slots left empty over the first `epochs` epochs of the plan."""
    count = groups.epoch_groups(epochs)
    filled = sum(len(chunk) for index in range(count) for chunk in groups[index])
    return 1 - filled / (count * groups.layout.description_slots)
