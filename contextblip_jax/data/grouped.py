"""Batches grouped by set: each set's 10 images come once, with every description of the set. Evaluation's plan
is here (file order, one pass); training's shuffled, repeated one is `set_sampler.py`; both fill `Layout`'s slots
through `PrepareGroup`.

ImageCoDe's sets carry 2.2 descriptions on average, each with its own target; a batch of descriptions with their
10 images each encodes every image about twice. A grouped batch holds sets and descriptions apart:

    images       [S, 10, H, W, 3]   S = groups x set slots (a padding slot is zeros)
    input_ids    [B, T]             B = groups x description slots; also attention_mask, target, is_video,
    example_id   [B]                example_id (-1: padding, dropped from every count; target -1 in training)
    set_index    [groups, B/groups] each description's set, counted within its group

A group is the part of the batch one data shard holds (`parallel.batch_shards`): its descriptions read only its
own sets, so sharding the leading axes puts a set and its descriptions on one device (`layers.gather_rows`).
Shapes are static: a group is filled with whole sets, in file order, until its set slots or its description
slots run out; a set with more descriptions than a group's slots is cut into several, each encoded once.

    layout = Layout.of(batch_size=36, groups=1)
    batches = pipeline.grouped_imagecode_dataset(config, source, layout, plan(set_chunks(examples, 36), layout))

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from contextblip_jax.data import augment, imagecode, transforms
from contextblip_jax.data.errors import SKIPPED_FIELD, DataError, check_readable
from contextblip_jax.data.imagecode import Example

SET_INDEX = "set_index"  # the field `stages.SET_INDEX` names: the model reads it
DESCRIPTIONS_PER_SET = 2.27
"""ImageCoDe's training descriptions per set (16,594 over 7,317), which sizes a layout's default set slots. An
empty set slot still runs the vision tower, an empty description slot only the text layers: with as many set
slots as the batch holds sets on average, neither kind is left empty often. Against half the descriptions (the
rule before) it leaves 2.5% of the set slots of ImageCoDe's training epoch at 36 descriptions empty instead of
9.4%, and 3.4% of the description slots instead of 0.3% (`set_sampler.padding_share`); with about 74% of a
pair's FLOPs in its image work at 64 tokens, about 4% fewer FLOPs per description."""
Chunk = tuple[int, ...]
"""The example ids of one set slot: descriptions of one set, in file order."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Slots of one data shard's group: `set_slots` sets and `description_slots` descriptions; `groups` groups
    make a global batch."""

    groups: int
    set_slots: int
    description_slots: int

    @classmethod
    def of(cls, batch_size: int, groups: int, set_slots: int = 0, section: str = "eval") -> Layout:
        """`batch_size` descriptions (global) over `groups` shards; `set_slots` sets per batch (global; 0: each
        shard's descriptions over `DESCRIPTIONS_PER_SET`, rounded, at least one). `section`: the config section
        errors name (`eval`, or `data` for training)."""
        if batch_size % groups:
            raise ValueError(f"{section}.batch_size {batch_size} is not divisible by the {groups} data shards")
        per_group = batch_size // groups
        sets = set_slots or groups * max(1, math.floor(per_group / DESCRIPTIONS_PER_SET + 0.5))
        if sets % groups:
            raise ValueError(f"{section}.set_slots {sets} is not divisible by the {groups} data shards")
        if sets // groups > per_group:
            raise ValueError(
                f"{section}.set_slots {sets} gives each of the {groups} data shards more set slots than its "
                f"{per_group} description slots: the extra ones could never be filled"
            )
        return cls(groups, sets // groups, per_group)

    def per_host(self, hosts: int) -> int:
        """The groups each of `hosts` hosts holds of a global batch (consecutive ones)."""
        if self.groups % hosts:
            raise ValueError(f"{self.groups} data shards cannot be split over {hosts} hosts")
        return self.groups // hosts


def set_members(examples: Sequence[Example]) -> list[Chunk]:
    """Each set's example ids in file order, sets in order of first appearance."""
    members: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        members.setdefault(example.set_name, []).append(index)
    return [tuple(ids) for ids in members.values()]


def set_chunks(examples: Sequence[Example], description_slots: int) -> list[Chunk]:
    """`set_members`, each cut to at most `description_slots` descriptions."""
    return [
        ids[start : start + description_slots]
        for ids in set_members(examples)
        for start in range(0, len(ids), description_slots)
    ]


def plan(chunks: Sequence[Chunk], layout: Layout) -> list[list[list[Chunk]]]:
    """Batches of groups of chunks: each group takes whole chunks, in order, while both kinds of slot last."""
    groups: list[list[Chunk]] = [[]]
    used = 0
    for chunk in chunks:
        if not 0 < len(chunk) <= layout.description_slots:
            raise ValueError(f"a chunk of {len(chunk)} descriptions does not fit {layout.description_slots} slots")
        group = groups[-1]
        if group and (len(group) == layout.set_slots or used + len(chunk) > layout.description_slots):
            groups.append([])
            group, used = groups[-1], 0
        group.append(chunk)
        used += len(chunk)
    groups += [[] for _ in range(-len(groups) % layout.groups)]
    return [groups[start : start + layout.groups] for start in range(0, len(groups), layout.groups)]


@dataclasses.dataclass
class PrepareGroup:
    """One group's arrays: each chunk's 10 images decoded once (in training with one augmentation draw, whose
    text-aware flip mirrors every description of the chunk), its descriptions only tokenised. A damaged set
    becomes padding under `on_error="skip"` (logged; training counts its descriptions as skipped)."""

    transform: transforms.PrepareImageCode
    source: Any
    examples: Sequence[Example]
    layout: Layout

    def __call__(self, group: list[Chunk], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        size = self.transform.image_size
        images = np.zeros((self.layout.set_slots, imagecode.NUM_CANDIDATES, size, size, 3), np.float32)
        rows = [self.transform.padding() for _ in range(self.layout.description_slots)]
        set_index = np.zeros(self.layout.description_slots, np.int32)
        at = skipped = 0
        for slot, chunk in enumerate(group):
            try:
                images[slot], mirror = self.transform.set_images(check_readable(self.source[chunk[0]]), rng)
            except DataError as error:
                if self.transform.on_error == "raise":
                    raise
                skipped += len(chunk)
                logging.warning(
                    "skipped the %d description(s) of a damaged set, padding instead: %s",
                    len(chunk),
                    error,
                )
                at += len(chunk)
                continue
            for offset, example_id in enumerate(chunk):
                example = self.examples[example_id]
                text = augment.flip_text(example.description) if mirror else example.description
                rows[at + offset] = self.transform.description(text, example.target, example.is_video, example_id)
                set_index[at + offset] = slot
            at += len(chunk)
        fields = ("input_ids", "attention_mask", "target", "is_video", "example_id")
        text = {name: np.stack([np.asarray(row[name]) for row in rows]) for name in fields}
        out = {"images": images, SET_INDEX: set_index, **text}
        if self.transform.train:
            out[SKIPPED_FIELD] = np.int32(skipped)
        return out


def merge_groups(groups: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This host's groups [g, ...] as one host batch: sets and descriptions flattened, `set_index` kept [g, b]."""
    return {name: value if name == SET_INDEX else value.reshape(-1, *value.shape[2:]) for name, value in groups.items()}


def grouped_batches(
    transform: transforms.PrepareImageCode,
    source: Any,
    examples: Sequence[Example],
    layout: Layout,
    batches: list[list[list[Chunk]]],
    shard: tuple[int, int],
) -> grain.MapDataset:
    """This host's part of every planned batch (its consecutive groups), lazily: `pipeline.read_ahead` decodes."""
    index, count = shard
    per_host = layout.per_host(count)
    mine = [group for batch in batches for group in batch[index * per_host : (index + 1) * per_host]]
    ds = grain.MapDataset.source(mine).map(PrepareGroup(transform, source, examples, layout))
    return ds.batch(per_host).map(merge_groups)
