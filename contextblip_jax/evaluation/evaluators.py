"""Evaluators: each scores one ImageCoDe split with whatever predict function it is given.

An evaluator reads its split (parses the annotation file, lists every set, or opens the records) once, when it is
built; every later pass only decodes images. The trainer builds its evaluators once per run and calls them at each
evaluation; `evaluate.py` builds one for the split it is asked about.

    evaluators = build_evaluators(config, stage, mesh)          # [] for a stage without candidate scores
    rows = [e.run(lambda batch: predict(params, batch), step) for e in evaluators]

Imports: its own package (`evaluation`), `data`, `parallel`, `runconfig`, `stages`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from contextblip_jax import parallel, runconfig
from contextblip_jax.data.pipeline import DataConfig, imagecode_dataset, imagecode_source
from contextblip_jax.evaluation.scoring import accuracy, score_split
from contextblip_jax.stages import Stage

Predict = Callable[[Mapping[str, jax.Array]], jax.Array]


class ImageCodeEvaluator:
    """Accuracy overall / video / static of a predict function on one split (`split` is `valid` or `test`)."""

    def __init__(self, data: DataConfig, split: str, mesh: jax.sharding.Mesh):
        self.data, self.split = data, split
        self.source = imagecode_source(data, split)
        self.sharding = parallel.batch_sharding(mesh)

    def score(self, predict: Predict) -> dict[str, np.ndarray]:
        """Every example's prediction, target and kind, in example order (see `scoring.score_split`)."""
        batches = imagecode_dataset(self.data, self.split, train=False, source=self.source)
        return score_split(predict, batches, self.sharding)

    def run(self, predict: Predict, step: int) -> dict[str, Any]:
        """The split's metrics row: `step`, `split`, `acc`, `acc_video`, `acc_static`, `descriptions`."""
        return {"step": step, "split": self.split, **accuracy(self.score(predict))}


def build_evaluators(config: ml_collections.ConfigDict, stage: Stage, mesh: jax.sharding.Mesh) -> list:
    """One evaluator per split in `config.eval.splits`; none for a stage without candidate scores (stage 1)."""
    if not stage.evaluates:
        return []
    data = runconfig.data_config(config, train=False)
    return [ImageCodeEvaluator(data, split, mesh) for split in config.eval.splits]
