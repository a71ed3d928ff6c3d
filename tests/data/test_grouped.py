"""Grouped evaluation batches: every description lands once, beside its own set, within each group's slots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contextblip_jax.data import grouped, pipeline
from contextblip_jax.data.imagecode import Example, ImageCodeSource


def examples_of(descriptions_per_set: list[int]) -> list[Example]:
    return [
        Example(f"set{s}", f"text {s}.{d}", d, d % 10, False, ())
        for s, count in enumerate(descriptions_per_set)
        for d in range(count)
    ]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(1, 6), min_size=0, max_size=40),
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 9),
    set_slots=st.integers(0, 3),
)
def test_the_plan_places_every_description_once_within_the_slots(counts, groups, per_group, set_slots):
    layout = grouped.Layout.of(groups * per_group, groups, min(set_slots, per_group) * groups)
    examples = examples_of(counts)
    batches = grouped.plan(grouped.set_chunks(examples, layout.description_slots), layout)
    placed = [i for batch in batches for group in batch for chunk in group for i in chunk]
    assert sorted(placed) == list(range(len(examples)))
    assert placed == sorted(placed)  # file order
    for batch in batches:
        assert len(batch) == groups
        for group in batch:
            assert len(group) <= layout.set_slots
            assert sum(map(len, group)) <= layout.description_slots
            for chunk in group:
                assert len({examples[i].set_name for i in chunk}) == 1


def test_sets_are_cut_only_when_they_exceed_a_groups_description_slots():
    chunks = grouped.set_chunks(examples_of([1, 2, 5]), description_slots=2)
    assert chunks == [(0,), (1, 2), (3, 4), (5, 6), (7,)]


def test_a_layout_that_does_not_split_over_the_shards_is_refused():
    with pytest.raises(ValueError, match="not divisible by the 4 data shards"):
        grouped.Layout.of(6, 4)
    with pytest.raises(ValueError, match=r"eval\.set_slots 3 is not divisible"):
        grouped.Layout.of(8, 2, set_slots=3)
    with pytest.raises(ValueError, match="more set slots than its 2 description slots"):
        grouped.Layout.of(4, 2, set_slots=6)
    with pytest.raises(ValueError, match="a chunk of 3 descriptions does not fit 2 slots"):
        grouped.plan([(0, 1, 2)], grouped.Layout(1, 1, 2))


def test_default_set_slots_follow_imagecodes_descriptions_per_set():
    """As many set slots as a shard's descriptions make sets at 2.27 each, rounded, at least one."""
    assert grouped.Layout.of(36, 1) == grouped.Layout(1, 16, 36)
    assert grouped.Layout.of(40, 8) == grouped.Layout(8, 2, 5)
    assert [grouped.Layout.of(n, 1).set_slots for n in (1, 2, 3, 4, 5, 6, 12)] == [1, 1, 1, 2, 2, 3, 5]
    assert grouped.Layout.of(36, 1, set_slots=18).set_slots == 18


def test_each_description_points_at_its_own_sets_images(generated_root):
    """The batches' arrays: a description's `set_index` names the slot holding its set's images, decoded as the
    per-description pipeline decodes them, and padding carries example_id -1."""
    config = pipeline.DataConfig(root=generated_root, image_size=32, batch_size=4, max_text_length=16)
    source = ImageCodeSource(generated_root, "valid")
    layout = grouped.Layout.of(4, 2, set_slots=2)
    batches = grouped.plan(grouped.set_chunks(source.examples, layout.description_slots), layout)
    per_description = {
        int(i): images
        for batch in pipeline.imagecode_dataset(config, "valid", train=False, source=source)
        for i, images in zip(batch["example_id"], batch["images"], strict=True)
    }
    seen = []
    for batch in pipeline.grouped_imagecode_dataset(config, source, layout, batches):
        assert batch["images"].shape == (2, 10, 32, 32, 3) and batch["set_index"].shape == (2, 2)
        assert batch["input_ids"].shape == (4, 16)
        sets = batch["images"].reshape(2, 1, 10, 32, 32, 3)
        for row, example_id in enumerate(batch["example_id"]):
            if example_id < 0:
                continue
            group, slot = divmod(row, 2)
            np.testing.assert_array_equal(sets[group, batch["set_index"][group, slot]], per_description[example_id])
            seen.append(int(example_id))
    assert sorted(seen) == list(range(len(source)))
