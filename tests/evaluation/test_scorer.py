"""Scoring one set for several descriptions (`predict --text` repeated): together, over one encoding of the set,
as each alone."""

from __future__ import annotations

import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax.evaluation import scorer
from contextblip_jax.models.contextblip import ContextBLIP
from tests.tiny import tiny_contextblip


@functools.cache
def model() -> ContextBLIP:
    return ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("stage", ["zeroshot", "finetune", "context"])
def test_several_descriptions_score_as_each_alone(stage):
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((1, 10, 32, 32, 3)), jnp.float32)
    ids = rng.integers(1000, 2000, size=(3, 8)).astype(np.int32)
    ids[:, 0] = 30523
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    together = scorer.set_scores(model(), stage, images, ids, mask, is_video=True)
    assert together.shape == (3, 10)
    for row in range(3):
        alone = scorer.set_scores(model(), stage, images, ids[row : row + 1], mask[row : row + 1], is_video=True)
        chex.assert_trees_all_close(together[row], alone[0], atol=1e-6, rtol=1e-6)


def test_the_ranking_lists_the_candidates_best_first():
    names = [f"img{i}.jpg" for i in range(4)]
    ranked = scorer.ranking(np.array([0.1, 0.7, 0.3, 0.5]), names)
    assert [r["index"] for r in ranked] == [1, 3, 2, 0]
    assert ranked[0] == {"rank": 1, "index": 1, "image": "img1.jpg", "score": 0.7}
