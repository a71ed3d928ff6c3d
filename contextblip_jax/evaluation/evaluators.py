"""Evaluators: each scores one ImageCoDe split with whatever predict function it is given.

An evaluator reads its split (parses the annotation file, lists every set, or opens the records) once, when it is
built, and plans its batches then; every later pass only decodes images. The trainer builds its evaluators once
per run and calls them at each evaluation; `evaluate.py` builds one for the split it is asked about.

    evaluators = build_evaluators(config, stage, mesh)          # [] for a stage without candidate scores
    rows = [e.run(lambda batch: predict(params, batch), step) for e in evaluators]

With `eval.group_by_set` (the default) batches hold whole sets, each set's images once (`data/grouped.py`), so
every image is encoded once per pass instead of once per description; the scores are the same up to float
rounding.

Imports: its own package (`evaluation`), `data`, `parallel`, `runconfig`, `stages`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from contextblip_jax import parallel, runconfig
from contextblip_jax.data import grouped, imagecode
from contextblip_jax.data.pipeline import DataConfig, grouped_imagecode_dataset, imagecode_dataset, imagecode_source
from contextblip_jax.evaluation.scoring import accuracy, collect, score_split
from contextblip_jax.stages import Stage

Predict = Callable[[Mapping[str, jax.Array]], jax.Array]


class ImageCodeEvaluator:
    """Accuracy overall / video / static of a predict function on one split (`split` is `valid` or `test`).

    `group_by_set`: batches of whole sets (`set_slots` sets per batch, 0: automatic; `grouped.Layout.of`). A
    source that does not list its examples (array_record files) is scored per description, and says so."""

    def __init__(
        self,
        data: DataConfig,
        split: str,
        mesh: jax.sharding.Mesh,
        group_by_set: bool = True,
        set_slots: int = 0,
    ):
        self.data, self.split = data, split
        self.source = imagecode_source(data, split)
        self.sharding = parallel.batch_sharding(mesh)
        examples = getattr(self.source, "examples", None)
        if group_by_set and examples is None:
            logging.warning("%s: the records do not list their sets; scoring per description", split)
        self.layout = None
        if group_by_set and examples is not None:
            self.layout = grouped.Layout.of(data.batch_size, parallel.batch_shards(mesh), set_slots)
            chunks = grouped.set_chunks(examples, self.layout.description_slots)
            self.plan = grouped.plan(chunks, self.layout)
            self.images_encoded = imagecode.NUM_CANDIDATES * len(chunks)
        else:
            self.images_encoded = imagecode.NUM_CANDIDATES * len(self.source)
        self.sets = len({example.set_name for example in examples}) if examples is not None else None

    def batches(self) -> Any:
        """One pass over the split's batches, grouped or per description."""
        if self.layout is not None:
            return grouped_imagecode_dataset(self.data, self.source, self.layout, self.plan)
        return imagecode_dataset(self.data, self.split, train=False, source=self.source)

    def score(self, predict: Predict) -> dict[str, np.ndarray]:
        """Every example's prediction, target and kind, in example order (see `scoring.score_split`)."""
        return score_split(predict, self.batches(), self.sharding)

    def collect(self, fn: Predict) -> dict[str, np.ndarray]:
        """`fn`'s output for every example (`output`) with its fields, in example order (`scoring.collect`)."""
        return collect(fn, self.batches(), self.sharding)

    def run(self, predict: Predict, step: int) -> dict[str, Any]:
        """The split's metrics row: `step`, `split`, `acc`, `acc_video`, `acc_static`, `descriptions`."""
        return {"step": step, "split": self.split, **accuracy(self.score(predict))}


def build_evaluators(config: ml_collections.ConfigDict, stage: Stage, mesh: jax.sharding.Mesh) -> list:
    """One evaluator per split in `config.eval.splits`; none for a stage without candidate scores (stage 1)."""
    if not stage.evaluates:
        return []
    data = runconfig.data_config(config, train=False)
    group, slots = config.eval.group_by_set, config.eval.set_slots
    return [ImageCodeEvaluator(data, split, mesh, group, slots) for split in config.eval.splits]
