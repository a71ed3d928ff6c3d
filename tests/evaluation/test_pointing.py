"""The pointing test's arithmetic on hand-made maps and boxes."""

from __future__ import annotations

import numpy as np
import pytest

from contextblip_jax.evaluation.pointing import area_share, cells_hit, distractors, pointing

LEFT_TOP = (0.05, 0.05, 0.2, 0.2)  # inside patch (0, 0) of a 4×4 grid
ACROSS = (0.2, 0.45, 0.3, 0.55)  # across the corner of patches (1, 0), (2, 0), (1, 1), (2, 1)


def test_cells_hit_marks_the_patches_a_box_overlaps():
    assert np.argwhere(cells_hit([LEFT_TOP], 4)).tolist() == [[0, 0]]
    assert np.argwhere(cells_hit([ACROSS], 4)).tolist() == [[1, 0], [1, 1], [2, 0], [2, 1]]


def test_area_share_is_the_union_of_the_boxes():
    assert area_share([(0.0, 0.0, 0.5, 0.5)]) == pytest.approx(0.25)
    assert area_share([(0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)]) == pytest.approx(0.375)


def test_pointing_counts_hits_against_both_chance_levels():
    on, off = np.zeros((4, 4)), np.zeros((4, 4))
    on[0, 0], off[3, 3] = 1.0, 1.0
    found = pointing([on, off, on], [[LEFT_TOP], [LEFT_TOP], []])
    assert found["descriptions"] == 2 and found["no_shape"] == 1
    assert found["hit_rate"] == 0.5
    assert found["cell_chance"] == pytest.approx(1 / 16)
    assert found["area_share"] == pytest.approx(0.15 * 0.15, rel=0.05)


def test_distractor_maps_are_told_by_where_they_peak():
    """Target 0's named shape sits in patch (0, 0); candidates 1-3 show their shape in patch (3, 3)."""
    named, own = [LEFT_TOP], [(0.8, 0.8, 0.9, 0.9)]
    maps = np.zeros((4, 4, 4))
    maps[1, 0, 0] = 1.0  # looks where the description's shape is
    maps[2, 3, 3] = 1.0  # looks at its own shape
    maps[3, 1, 2] = 1.0  # elsewhere
    frames = [named, own, own, own]
    found = distractors([maps], [0], [named], [frames])
    assert found == {"pairs": 3, "named_place": 1 / 3, "own_shapes": 1 / 3, "elsewhere": 1 / 3}
    overlapping = distractors([maps], [0], [named], [[named, named, own, []]])  # sharing a patch, or no shape
    assert overlapping["pairs"] == 1
