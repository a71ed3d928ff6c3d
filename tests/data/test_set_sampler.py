"""The grouped training plan: every description once per epoch, within the slots, the same from any index.

The grain pipeline over it (`pipeline.grouped_train_dataset`) is tested in `test_grouped_training.py`.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contextblip_jax.data import grouped, set_sampler


def sets_of(counts: list[int]) -> list[tuple[int, ...]]:
    sets, start = [], 0
    for count in counts:
        sets.append(tuple(range(start, start + count)))
        start += count
    return sets


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(1, 5), min_size=1, max_size=30),
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.integers(1, 7),
    set_slots=st.integers(1, 4),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 3),
)
def test_every_description_comes_once_per_epoch_within_the_slots(counts, groups, per_group, set_slots, epochs, seed):
    layout = grouped.Layout.of(groups * per_group, groups, min(set_slots, per_group) * groups, section="data")
    sets = sets_of(counts)
    owner = {i: s for s, members in enumerate(sets) for i in members}
    plan = set_sampler.SetGroups(sets, layout, seed, num_epochs=epochs)
    assert len(plan) % groups == 0
    laid = [plan[i] for i in range(plan.epoch_groups(epochs))]
    with pytest.raises(IndexError):
        plan[len(laid)]
    stream = [i for group in laid for chunk in group for i in chunk]
    assert len(stream) == epochs * sum(counts)
    for epoch in range(epochs):  # the e-th pass over the descriptions ends before the (e+1)-th begins
        assert sorted(stream[epoch * sum(counts) : (epoch + 1) * sum(counts)]) == list(range(sum(counts)))
    for index, group in enumerate(laid):
        assert 0 < len(group) <= layout.set_slots
        filled = sum(map(len, group))
        assert filled <= layout.description_slots
        if index < len(laid) - 1:  # only a group whose set slots ran out (or the very last) has padding
            assert filled == layout.description_slots or len(group) == layout.set_slots
        for chunk in group:
            members = sets[owner[chunk[0]]]
            assert chunk == members[members.index(chunk[0]) : members.index(chunk[0]) + len(chunk)]


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 4), min_size=1, max_size=20), start=st.integers(0, 60))
def test_any_group_is_the_same_read_first_after_others_or_from_a_copy(counts, start):
    layout = grouped.Layout.of(4, 1, 2, section="data")
    sequential = set_sampler.SetGroups(sets_of(counts), layout, seed=5)
    expected = [sequential[i] for i in range(start + 3)][start:]
    fresh = set_sampler.SetGroups(sets_of(counts), layout, seed=5)
    assert [fresh[i] for i in range(start, start + 3)] == expected
    copy = pickle.loads(pickle.dumps(fresh))
    assert [copy[i] for i in range(start, start + 3)] == expected


def test_the_order_is_seeded_and_changes_every_epoch_and_file_order_without_shuffle():
    sets = sets_of([1] * 12)
    layout = grouped.Layout.of(12, 1, 12, section="data")

    def epochs(seed: int, shuffle: bool = True) -> list[list[int]]:
        plan = set_sampler.SetGroups(sets, layout, seed, shuffle)
        return [[chunk[0] for chunk in plan[e]] for e in range(3)]

    assert epochs(0) == epochs(0)
    assert epochs(0) != epochs(1)
    assert len({tuple(order) for order in epochs(0)}) == 3
    assert epochs(0, shuffle=False) == [list(range(12))] * 3


def test_a_set_is_split_only_where_the_description_slots_run_out():
    layout = grouped.Layout.of(4, 1, 4, section="data")
    plan = set_sampler.SetGroups(sets_of([3, 3]), layout, seed=0, shuffle=False)
    assert [plan[0], plan[1]] == [[(0, 1, 2), (3,)], [(4, 5), (0, 1)]]  # the next epoch follows on


def test_padding_share_counts_the_empty_description_slots():
    layout = grouped.Layout.of(4, 1, 2, section="data")
    plan = set_sampler.SetGroups(sets_of([1, 1, 1, 1]), layout, seed=0, shuffle=False)
    assert set_sampler.padding_share(plan, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no training sets"):
        set_sampler.SetGroups([], layout, seed=0)
