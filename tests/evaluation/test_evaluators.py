"""An evaluator scores the same with batches grouped by set as per description, and encodes each image once.

The generated training split (read as an evaluation split) has 1 to 3 descriptions per set; the tiny random
model's scores of every description are compared (float32, 1e-6), then the predictions and the counts of images
that went through the vision tower.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
from flax import nnx

from contextblip_jax import parallel, runconfig, stages
from contextblip_jax.evaluation.evaluators import ImageCodeEvaluator
from contextblip_jax.models.contextblip import ContextBLIP
from tests.runs import run_config


def test_grouped_and_per_description_evaluation_agree(data_root):
    config = runconfig.prepare(run_config(data_root, stage="finetune"), weights=False)
    data = runconfig.data_config(config, train=False)
    mesh = parallel.make_mesh(config.mesh)
    stage = stages.get("finetune")
    graphdef, state = nnx.split(ContextBLIP(runconfig.model_config(config), rngs=nnx.Rngs(0)))
    jitted = jax.jit(lambda state, batch: stage.score(nnx.merge(graphdef, state), batch))

    def recorded(evaluator: ImageCodeEvaluator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rows: dict[int, np.ndarray] = {}

        def predict(batch):
            scores = jitted(state, batch)
            for example_id, row in zip(np.asarray(batch["example_id"]), np.asarray(scores), strict=True):
                if example_id >= 0:
                    rows[int(example_id)] = row
            return scores

        scored = evaluator.score(predict)
        return scored, np.stack([rows[i] for i in range(len(rows))])

    grouped = ImageCodeEvaluator(data, "train", mesh, group_by_set=True, set_slots=4)
    single = ImageCodeEvaluator(data, "train", mesh, group_by_set=False)
    grouped_scored, grouped_scores = recorded(grouped)
    single_scored, single_scores = recorded(single)

    descriptions = len(single.source)
    per_set = np.unique([e.set_name for e in single.source.examples], return_counts=True)[1]
    assert set(per_set.tolist()) == {1, 2, 3}  # the data has every count ImageCoDe has
    assert grouped_scores.shape == single_scores.shape == (descriptions, 10)
    chex.assert_trees_all_close(grouped_scores, single_scores, atol=1e-6, rtol=1e-6)
    order = np.argsort(grouped_scored["example_id"])
    np.testing.assert_array_equal(grouped_scored["example_id"][order], single_scored["example_id"])
    np.testing.assert_array_equal(grouped_scored["prediction"][order], single_scored["prediction"])
    assert grouped.sets == single.sets == len(per_set)
    assert grouped.images_encoded == 10 * len(per_set)
    assert single.images_encoded == 10 * descriptions
