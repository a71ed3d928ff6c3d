"""The pure train step in-process: gradient accumulation and frozen parameters, on the tiny model."""

from __future__ import annotations

import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from contextblip_jax import losses, stages
from contextblip_jax.models.config import AdapterConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.step import TrainState, make_predict_step, make_train_step, split_model
from contextblip_jax.trainconfig import base_config
from tests.tiny import stage_batch, tiny_contextblip

pytestmark = pytest.mark.xdist_group("test_step")  # one worker computes each cached `one_step` once

DESCRIPTIONS = 4
CANDIDATES = 4
CONFIG = tiny_contextblip(
    blip=dataclasses.replace(
        VARIANTS["tiny"].blip,
        vision=dataclasses.replace(VARIANTS["tiny"].blip.vision, depth=2),
        text=dataclasses.replace(VARIANTS["tiny"].blip.text, depth=1),
    ),
    adapter=AdapterConfig(levels=(1, 2)),
)
"""The tiny model cut to 2 vision blocks and 1 text layer, and 4 candidates per description instead of 10: what is
tested (accumulation, the frozen/trainable split) does not depend on depth, and compiling dominates the time."""


def batch(stage: stages.Stage | None = None) -> dict[str, jax.Array]:
    """Descriptions x 10 candidates, or (for a caption stage) each description with its first candidate."""
    return stage_batch(stage, [3, 0, 2, 1], [True, False, True, True], CANDIDATES, length=8, padded_from=5)


@functools.cache
def mean_reduced_finetune() -> stages.Stage:
    """Stage 2a with its cross-entropy averaged over descriptions: a loss that accumulates by averaging."""

    def loss(model, batch, key, config):
        del key, config
        logits = model.finetune_logits(batch["images"], batch["input_ids"], batch["attention_mask"])
        return losses.candidate_loss(logits, batch["target"], "mean"), {}

    return dataclasses.replace(stages.get("finetune"), loss=loss, reduction="mean")


@functools.cache
def model() -> ContextBLIP:
    """Built once: splitting reads the model and never changes it."""
    return ContextBLIP(CONFIG, rngs=nnx.Rngs(0))


@functools.cache
def one_step(stage: stages.Stage, accum_steps: int) -> tuple[TrainState, TrainState, dict]:
    """(state before, state after, metrics) of one step with SGD at rate 1 (the update is minus the gradient)."""
    spec, trainable, frozen = split_model(model(), stage.trainable_filter())
    tx = optax.sgd(1.0)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
    step = jax.jit(make_train_step(spec, stage, base_config().loss, tx, seed=0, accum_steps=accum_steps))
    before = jax.tree.map(np.asarray, state)
    after, metrics = step(state, batch(stage))
    return before, jax.tree.map(np.asarray, after), jax.device_get(metrics)


@pytest.mark.parametrize("stage", [stages.get("finetune"), mean_reduced_finetune()], ids=["summed", "averaged"])
@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_micro_batches_equal_one_step_over_the_whole_batch(stage, accum_steps):
    """Equal parameters after one SGD step at rate 1 mean equal gradients."""
    _, whole, whole_metrics = one_step(stage, 1)
    _, accumulated, metrics = one_step(stage, accum_steps)
    assert abs(metrics["loss"] - whole_metrics["loss"]) <= 1e-6 * abs(whole_metrics["loss"])
    chex.assert_trees_all_close(accumulated.trainable, whole.trainable, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(metrics["grad_norm"], whole_metrics["grad_norm"], atol=1e-6, rtol=0)
    if stage.reduction == "sum":  # the summed loss is DESCRIPTIONS times the averaged one
        _, _, averaged = one_step(mean_reduced_finetune(), 1)
        np.testing.assert_allclose(whole_metrics["loss"], DESCRIPTIONS * averaged["loss"], rtol=1e-6)


@pytest.mark.parametrize("name", ["pretrain", "finetune", "context"])
def test_frozen_parameters_stay_bit_identical_through_the_trainers_split(name):
    stage = stages.get(name)
    before, after, metrics = one_step(stage, 1)
    assert before.frozen and before.trainable
    assert not set(before.frozen) & set(before.trainable)
    for key, value in before.frozen.items():
        np.testing.assert_array_equal(after.frozen[key], value, err_msg=f"{name}: frozen {key} changed")
    changed = [k for k, v in before.trainable.items() if not np.array_equal(after.trainable[k], v)]
    assert len(changed) == len(before.trainable), f"{name}: only {len(changed)} of {len(before.trainable)} moved"
    assert int(after.step) == 1 and np.isfinite(metrics["loss"])


def test_predict_step_scores_every_candidate_and_refuses_a_stage_without_scores():
    spec, trainable, frozen = split_model(model(), stages.get("finetune").trainable_filter())
    scores = make_predict_step(spec, stages.get("finetune"))(trainable, frozen, batch())
    chex.assert_shape(scores, (DESCRIPTIONS, CANDIDATES))
    b = batch()
    np.testing.assert_allclose(scores, model().finetune_logits(b["images"], b["input_ids"], b["attention_mask"]))
    with pytest.raises(ValueError, match="pretrain"):
        make_predict_step(spec, stages.get("pretrain"))


def test_this_module_runs_as_one_xdist_group(request):
    """Under xdist, the cached steps above are only shared if the group reaches the scheduler (pytest 9.2 with
    pytest-xdist 3.8 silently dropped every group: the node id lost its `@group` suffix)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert request.node.nodeid.endswith("@test_step"), request.node.nodeid
