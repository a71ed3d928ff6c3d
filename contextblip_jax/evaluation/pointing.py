"""The pointing test: does a heatmap's maximum on the target image fall on the shapes the description names?

On generated data the records say where every shape was drawn (`synthetic.scene_boxes`). A description is a
hit when the patch holding its target map's maximum overlaps one of its boxes. Two chance levels come with the
hit rate: `cell_chance`, the share of patches that overlap a box (a patch picked at random: the fair baseline,
as the map has one value per patch), and `area_share`, the share of the image the boxes cover (a random point).
At 4×4 patches over shapes a fifth of a patch wide, the second is far below the first: a patch is much larger
than a shape.

Where every shape in view is named (the main job's kinds), any map drawn to shapes at all hits: `distractors`
asks what the text adds. On each wrong candidate whose shapes lie on other patches than the target's named shapes,
does the map peak where the description's shapes are on the target (`named_place`: the text leads), on the
candidate's own shapes (`own_shapes`: the image leads), or elsewhere?

Imports: its own package (`evaluation`), `data`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contextblip_jax.data.scenes import Box

_RASTER = 256
"""Side of the raster the boxes' union area is measured on."""


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def cells_hit(boxes: Sequence[Box], grid: int) -> np.ndarray:
    """[grid, grid] booleans: which patches (rows top to bottom) overlap one of the boxes (fractions)."""
    cells = np.zeros((grid, grid), bool)
    for row in range(grid):
        for column in range(grid):
            cell = (column / grid, row / grid, (column + 1) / grid, (row + 1) / grid)
            cells[row, column] = any(_overlaps(cell, box) for box in boxes)
    return cells


def area_share(boxes: Sequence[Box]) -> float:
    """The share of the image the union of the boxes covers."""
    covered = np.zeros((_RASTER, _RASTER), bool)
    centres = (np.arange(_RASTER) + 0.5) / _RASTER
    for left, top, right, bottom in boxes:
        columns = (centres >= left) & (centres < right)
        rows = (centres >= top) & (centres < bottom)
        covered |= rows[:, None] & columns[None, :]
    return float(covered.mean())


def pointing(maps: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]) -> dict[str, float | int]:
    """Hit rate of target maps [grid, grid] against their descriptions' boxes, with both chance levels (module
    docstring); descriptions that name no shape in view are left out and counted (`no_shape`)."""
    hits, cell_chances, areas, skipped = [], [], [], 0
    for heat, named in zip(maps, boxes, strict=True):
        if not named:
            skipped += 1
            continue
        cells = cells_hit(named, heat.shape[0])
        row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits.append(bool(cells[row, column]))
        cell_chances.append(float(cells.mean()))
        areas.append(area_share(named))

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {
        "descriptions": len(hits),
        "hit_rate": mean(hits),
        "cell_chance": mean(cell_chances),
        "area_share": mean(areas),
        "no_shape": skipped,
    }


def distractors(
    maps: Sequence[np.ndarray], targets: Sequence[int], named: Sequence[Sequence[Box]], frames: Sequence[Sequence]
) -> dict[str, float | int]:
    """Where the maps of the wrong candidates peak (module docstring): `maps[i]` [candidates, grid, grid] of
    description i, `targets[i]` its target, `named[i]` its named shapes' boxes on the target, `frames[i][k]` the
    boxes of candidate k's shapes. Candidates whose shapes share a patch with the named ones are left out."""
    counts = {"named_place": 0, "own_shapes": 0, "elsewhere": 0}
    for heat, target, boxes, candidates in zip(maps, targets, named, frames, strict=True):
        if not boxes:
            continue
        grid = heat.shape[-1]
        place = cells_hit(boxes, grid)
        for k, own in enumerate(candidates):
            shapes = cells_hit(own, grid)
            if k == target or not own or (shapes & place).any():
                continue
            row, column = np.unravel_index(int(np.argmax(heat[k])), heat[k].shape)
            found = "named_place" if place[row, column] else "own_shapes" if shapes[row, column] else "elsewhere"
            counts[found] += 1
    pairs = sum(counts.values())
    return {"pairs": pairs, **{name: count / pairs if pairs else float("nan") for name, count in counts.items()}}
