"""The scorer: a run's model ready to score outside training (`evaluate`, MMVP-VLM), from its best, latest or
a given checkpoint, or from `config.init` when the run has none.

Imports: its own package (`evaluation`), `checkpoints`, `data`, `models`, `parallel`, `runconfig`, `stages`,
`training.step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from contextblip_jax import parallel, runconfig, stages
from contextblip_jax.checkpoints import weights
from contextblip_jax.data import mmvp
from contextblip_jax.data.preprocess import BlipTokenizer, load_image
from contextblip_jax.evaluation.scoring import score_mmvp
from contextblip_jax.models import axes
from contextblip_jax.training.step import make_predict_step, split_model


@dataclasses.dataclass
class Scorer:
    """A model ready to score on the config's mesh: `predict(batch) -> [B, candidates]`, and its step."""

    mesh: jax.sharding.Mesh
    predict: Callable[[Mapping[str, jax.Array]], jax.Array]
    step: int


def scorer(config: ml_collections.ConfigDict, workdir: str, choice: str = "best") -> Scorer:
    """The run's chosen checkpoint (`weights.run_params`: best, latest or a step; `config.init` when the run has
    none), read straight into its shards of the config's mesh."""
    stage = stages.get(config.stage)
    mesh = parallel.make_mesh(config.mesh)
    rules = axes.logical_rules(config.logical_rules)
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
    data = runconfig.data_config(config, train=False)
    tokenizer = BlipTokenizer(data.vocab)
    return score_mmvp(
        scoring.predict,
        mmvp.read_pairs(root, pre_caption_words=data.pre_caption_words),
        lambda texts: tokenizer(texts, data.max_text_length, data.first_token),
        lambda path: load_image(path, data.image_size),
    )
