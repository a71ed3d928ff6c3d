"""CI's short kill-anywhere run (see kills.py): one SIGTERM (the preemption a cloud VM gets: exit 0, the step it
stopped at saved), then 3 SIGKILLs, one of each kind, then an exact comparison with an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.reliability import kills


@pytest.mark.long
def test_a_run_preempted_once_and_killed_three_times_ends_exactly_as_an_uninterrupted_one(tmp_path, data_root):
    report = kills.run(kills=3, terms=1, seed=0, data_root=data_root, base=str(tmp_path), steps=12)
    assert report["kills"] == 3 and report["kills_by_kind"] == {"write": 1, "step": 1, "start": 1}
    assert len(report["preempted_at"]) == 1 and report["preempted_at"][0] >= 2
    assert report["rows_compared"] >= 12
    assert report["lock_takeovers"] == report["locks_left"] >= 2  # the next run took each lock a kill left at once
    assert report["locks_left_by_sigterm"] == 0  # a preempted run releases its lock as it exits


@pytest.mark.long
def test_a_grouped_run_killed_twice_ends_exactly_as_an_uninterrupted_one(tmp_path, data_root):
    """Training batches of whole sets (`data.group_by_set`) with augmentation resume bit for bit too: the plan
    and every draw are functions of the batch position grain's state stores."""
    grouped = {"data.group_by_set": True, "data.augment.random_resized_crop": True, "data.augment.flip": "text_aware"}
    report = kills.run(kills=2, seed=1, data_root=data_root, base=str(tmp_path), steps=10, extra=grouped)
    assert report["kills"] == 2 and report["rows_compared"] >= 10
