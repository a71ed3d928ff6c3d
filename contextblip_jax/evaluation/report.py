"""The evaluation report (`evaluate --report=DIR`): accuracy and its breakdowns, the hardest descriptions and a
sample of correct ones with every candidate's score, rank and heatmap, and on generated data the pointing test.

    summary = write_report(out, scored, examples, model, stage, data, layer=-1)

`scored` is the evaluator's `collect` of the split (`output` [N, 10] scores, `example_id`, `target`, `is_video`);
the report ranks candidates by those scores. Heatmaps (`explain.set_heatmaps`) are computed per set, each set's
images once for all its descriptions: for the sets shown, and on generated data (`synthetic.scene_boxes`)
for every set, as the pointing test reads every description's target map. `report_page.py` draws the page.

DIR receives `index.html`, `report.json` (what the page shows, as data), `plots/*.png` and `cards/<n>/<i>.png`
(candidate i of card n with its heatmap); nothing in it reaches the network.

Imports: its own package (`evaluation`), `data`, `models`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from contextblip_jax.data import imagecode
from contextblip_jax.data.pipeline import DataConfig
from contextblip_jax.data.synthetic import SceneBoxes
from contextblip_jax.evaluation import explain, report_page
from contextblip_jax.evaluation.pointing import distractors, pointing
from contextblip_jax.evaluation.scoring import accuracy
from contextblip_jax.models.contextblip import ContextBLIP


@dataclasses.dataclass(frozen=True)
class Card:
    """One description shown: why it was chosen (`hardest` or `correct`), its scores in set order and heatmaps."""

    reason: str
    example: imagecode.Example
    scores: list[float]
    ranks: list[int]
    prediction: int
    maps: np.ndarray


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The rank of each target among its candidates: 1 + how many score higher."""
    own = scores[np.arange(len(scores)), targets]
    return 1 + (scores > own[:, None]).sum(axis=1)


def candidate_ranks(scores: Sequence[float]) -> list[int]:
    """Each candidate's rank in its set (1 = best)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranks = np.empty(len(order), int)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks.tolist()


def choose(ranks: np.ndarray, margins: np.ndarray, hardest: int, correct: int, seed: int = 0) -> list[tuple[str, int]]:
    """(reason, row) of the shown descriptions: the `hardest` with the worst target rank (then the widest margin
    behind the best candidate), and `correct` drawn at random among those ranked first."""
    order = sorted(range(len(ranks)), key=lambda i: (-ranks[i], -margins[i], i))
    shown = [("hardest", i) for i in order[:hardest] if ranks[i] > 1]
    right = np.flatnonzero(ranks == 1)
    picked = np.random.default_rng(seed).choice(right, min(correct, len(right)), replace=False) if len(right) else []
    return shown + [("correct", int(i)) for i in sorted(picked)]


def write_report(
    out: str,
    scored: Mapping[str, np.ndarray],
    examples: Sequence[imagecode.Example],
    model: ContextBLIP,
    stage: str,
    data: DataConfig,
    *,
    layer: int = -1,
    rule: str = "gradcam",
    hardest: int = 8,
    correct: int = 4,
    boxes: SceneBoxes | None = None,
    about: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the report into `out` (module docstring) and returns `report.json`'s content."""
    start = time.perf_counter()
    labelled = scored["target"] >= 0
    if not labelled.any():
        raise ValueError("a report needs labelled descriptions: the split has no targets (use --split=valid)")
    scores = np.asarray(scored["output"], np.float64)[labelled]
    targets = scored["target"][labelled].astype(int)
    rows = [examples[int(i)] for i in scored["example_id"][labelled]]
    predictions = scores.argmax(axis=1)
    ranks = target_ranks(scores, targets)
    margins = scores.max(axis=1) - scores[np.arange(len(scores)), targets]
    chosen = choose(ranks, margins, hardest, correct)
    wanted_sets = {rows[i].set_name for _, i in chosen} | ({row.set_name for row in rows} if boxes else set())
    maps = _maps_by_row(rows, wanted_sets, model, stage, data, layer, rule)
    cards = [
        Card(reason, rows[i], scores[i].tolist(), candidate_ranks(scores[i]), int(predictions[i]), maps[i])
        for reason, i in chosen
    ]
    summary: dict[str, Any] = {
        **dict(about or {}),
        "stage": stage,
        "heatmap_layer": layer,
        "heatmap_rule": rule,
        **accuracy({"prediction": predictions, "target": targets, "is_video": scored["is_video"][labelled]}),
        "cards": len(cards),
    }
    if boxes is not None:
        found = [i for i in range(len(rows)) if (rows[i].set_name, rows[i].target) in boxes.described]
        named = [boxes.described[rows[i].set_name, rows[i].target] for i in found]
        summary["pointing"] = pointing([maps[i][rows[i].target] for i in found], named)
        summary["pointing"]["distractors"] = distractors(
            [maps[i] for i in found],
            [rows[i].target for i in found],
            named,
            [boxes.frames[rows[i].set_name] for i in found],
        )
    os.makedirs(out, exist_ok=True)
    plots = report_page.plots(out, rows, predictions, targets, ranks)
    report_page.write(out, summary, cards, plots)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    logging.info("report in %s (%d cards, %.1f s)", out, len(cards), summary["seconds"])
    return summary


def _maps_by_row(
    rows: Sequence[imagecode.Example],
    sets: set[str],
    model: ContextBLIP,
    stage: str,
    data: DataConfig,
    layer: int,
    rule: str,
) -> dict[int, np.ndarray]:
    """Every candidate's heatmap [10, grid, grid] for each row of a wanted set, one pass per set."""
    texts = explain.Texts(data)
    by_set: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.set_name in sets:
            by_set.setdefault(row.set_name, []).append(i)
    maps = {}
    for done, members in enumerate((by_set[name] for name in sorted(by_set)), start=1):
        found = explain.set_heatmaps(
            model,
            stage,
            rows[members[0]].image_paths,
            texts([rows[i].description for i in members]),
            data.image_size,
            layer,
            rule,
        )
        maps.update({i: found.maps[k] for k, i in enumerate(members)})
        if done % 25 == 0 or done == len(by_set):
            logging.info("heatmaps: %d of %d sets", done, len(by_set))
    return maps
