"""The scorer: a run's model ready to score outside training (`evaluate`, MMVP-VLM), from its best, latest or
a given checkpoint, or from `config.init` when the run has none; and one set's scores for several descriptions
with its ranking (`predict`).

Imports: its own package (`evaluation`), `checkpoints`, `data`, `models`, `parallel`, `runconfig`, `stages`,
`training.step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from contextblip_jax import parallel, runconfig, stages
from contextblip_jax.checkpoints import weights
from contextblip_jax.data import mmvp
from contextblip_jax.data.preprocess import BlipTokenizer, load_image
from contextblip_jax.evaluation.scoring import score_mmvp
from contextblip_jax.models import axes
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.training.step import make_predict_step, split_model


@dataclasses.dataclass
class Scorer:
    """A model ready to score on the config's mesh: `predict(batch) -> [B, candidates]`, its step, and the model
    itself (for heatmaps, `evaluation/explain.py`)."""

    mesh: jax.sharding.Mesh
    predict: Callable[[Mapping[str, jax.Array]], jax.Array]
    step: int
    model: ContextBLIP


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
    return Scorer(mesh, lambda batch: predict(trainable, frozen, batch), step, model)


def mmvp_accuracy(config: ml_collections.ConfigDict, scoring: Scorer, root: str) -> dict[str, float]:
    """MMVP-VLM pair accuracy of the model (see `scoring.score_mmvp`)."""
    data = runconfig.data_config(config, train=False)
    tokenizer = BlipTokenizer(data.vocab)
    return score_mmvp(
        scoring.predict,
        mmvp.read_pairs(root, pre_caption_words=data.pre_caption_words),
        lambda texts: tokenizer(texts, data.max_text_length, data.first_token),
        lambda path: load_image(path, data.image_size),
        config.eval.group_by_set,
    )


def set_scores(
    model: ContextBLIP,
    stage: str,
    images: jax.Array,
    ids: np.ndarray,
    mask: np.ndarray,
    is_video: bool,
) -> np.ndarray:
    """Scores [descriptions, candidates] of one set's images [1, C, S, S, 3] for each tokenised description; with
    several, the images go through the towers once (`set_index`: every description reads set 0)."""
    count = len(ids)
    batch = {
        "images": images,
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "is_video": jnp.full((count,), is_video),
    }
    if count > 1:
        batch[stages.SET_INDEX] = jnp.zeros((1, count), jnp.int32)
    return np.asarray(jax.device_get(stages.get(stage).score(model, batch)))


def ranking(scores: np.ndarray, names: list[str]) -> list[dict]:
    """The candidates best first: rank, index in the set, file name, score."""
    return [
        {"rank": rank + 1, "index": int(i), "image": names[i], "score": round(float(scores[i]), 4)}
        for rank, i in enumerate(np.argsort(-scores))
    ]
