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
