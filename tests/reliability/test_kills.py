"""The short kill-anywhere run of CI: 3 SIGKILLs, one of each kind (see kills.py), then an exact comparison."""

from __future__ import annotations

import pytest

from tests.reliability import kills


@pytest.mark.long
def test_a_run_killed_three_times_ends_exactly_as_an_uninterrupted_one(tmp_path, data_root):
    report = kills.run(kills=3, seed=0, data_root=data_root, base=str(tmp_path), steps=12)
    assert report["kills"] == 3 and report["kills_by_kind"] == {"write": 1, "step": 1, "start": 1}
    assert report["rows_compared"] >= 12
