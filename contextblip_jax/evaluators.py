"""Evaluators: each scores one ImageCoDe split with whatever predict function it is given; and the scorer, a
run's model ready to score outside training (evaluation, MMVP-VLM).

An evaluator reads its split (parses the annotation file, lists every set, or opens the records) once, when it is
built; every later pass only decodes images. The trainer builds its evaluators once per run and calls them at each
evaluation; `evaluate.py` builds one for the split it is asked about.

    evaluators = build_evaluators(config, stage, mesh)          # [] for a stage without candidate scores
    rows = [e.run(lambda batch: predict(params, batch), step) for e in evaluators]

Imports: the data pipeline, `scoring.py`, `parallel.py`, `step.py`, `weights.py` and the stage table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from contextblip_jax import parallel, trainconfig, weights
from contextblip_jax.data import inputs, mmvp
from contextblip_jax.data.pipeline import DataConfig, imagecode_dataset, imagecode_source
from contextblip_jax.data.preprocess import BlipTokenizer, load_image
from contextblip_jax.scoring import accuracy, score_mmvp, score_split
from contextblip_jax.stages import Stage
from contextblip_jax.step import make_predict_step, split_model

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
    data = inputs.data_config(config, train=False)
    return [ImageCodeEvaluator(data, split, mesh) for split in config.eval.splits]


@dataclasses.dataclass
class Scorer:
    """A model ready to score on the config's mesh: `predict(batch) -> [B, candidates]`, and its step."""

    mesh: jax.sharding.Mesh
    predict: Callable[[Mapping[str, jax.Array]], jax.Array]
    step: int


def scorer(config: ml_collections.ConfigDict, workdir: str, choice: str = "best") -> Scorer:
    """The run's chosen checkpoint (`weights.run_params`: best, latest or a step; `config.init` when the run has
    none), read straight into its shards of the config's mesh."""
    stage = trainconfig.check(config)
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config.logical_rules)
    found = weights.run_model(workdir, jnp.dtype(config.dtype), choice, mesh, rules)
    if found is not None:
        model, step = found
    else:
        model, origin = weights.initial_model(config, mesh)
        step = 0
        logging.info("no checkpoint in %s; scoring %s", workdir, origin)
    spec, trainable, frozen = split_model(model, stage.trainable_filter(config.trainable))
    predict = jax.jit(make_predict_step(spec, stage))
    return Scorer(mesh, lambda batch: predict(trainable, frozen, batch), step)


def mmvp_accuracy(config: ml_collections.ConfigDict, scoring: Scorer, root: str) -> dict[str, float]:
    """MMVP-VLM pair accuracy of the model (see `scoring.score_mmvp`)."""
    data = inputs.data_config(config, train=False)
    tokenizer = BlipTokenizer(data.vocab)
    return score_mmvp(
        scoring.predict,
        mmvp.read_pairs(root, pre_caption_words=data.pre_caption_words),
        lambda texts: tokenizer(texts, data.max_text_length, data.first_token),
        lambda path: load_image(path, data.image_size),
    )
