"""A train step on a grouped batch (each set's images once, `data/grouped.py`) equals the step on the same
descriptions with their images repeated, as the per-description pipeline gives them.

Sets carry 1, 2 and 3 descriptions. The grouped batch has 2 groups of 2 set slots and 4 description slots, so it
holds a padding set slot and two padding description slots (zeros, target -1, as `PrepareGroup` makes them),
which must add nothing. With 2 micro-batches each takes one whole group (`step._grouped_micro_batches`). Dropout
is off: its masks are drawn per description slot, and the two layouts have different slots.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from contextblip_jax import stages
from contextblip_jax.models.config import ContextConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training.step import TrainState, make_train_step, micro_batches, split_model
from tests.tiny import tiny_contextblip

pytestmark = pytest.mark.xdist_group("test_grouped_step")

CANDIDATES = 10
SET_OF_DESCRIPTION = (0, 1, 1, 2, 2, 2)
TARGETS = (3, 0, 9, 5, 5, 1)
SLOTS = (0, 1, 2, -1, 3, 4, 5, -1)
"""Where each description slot of the grouped batch comes from (-1: padding): group 0 holds sets 0 and 1, group
1 set 2 and an empty set slot."""
SET_INDEX = ((0, 1, 1, 0), (0, 0, 0, 0))


def per_description() -> dict[str, jax.Array]:
    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 2000, size=(len(TARGETS), 12))
    ids[:, 0] = 30523
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    sets = rng.standard_normal((3, CANDIDATES, 32, 32, 3)).astype(np.float32)
    return {
        "sets": sets,
        "images": sets[list(SET_OF_DESCRIPTION)],
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "target": np.asarray(TARGETS, np.int32),
        "is_video": np.asarray([False, True, True, False, False, True]),
    }


def grouped(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    slots = np.asarray(SLOTS)
    take = np.maximum(slots, 0)
    real = slots >= 0
    out = {
        name: np.where(real.reshape(-1, *[1] * (batch[name].ndim - 1)), batch[name][take], 0).astype(batch[name].dtype)
        for name in ("input_ids", "attention_mask", "is_video")
    }
    out["target"] = np.where(real, batch["target"][take], -1).astype(np.int32)
    out["images"] = np.concatenate([batch["sets"], np.zeros_like(batch["sets"][:1])])
    out[stages.SET_INDEX] = np.asarray(SET_INDEX, np.int32)
    return out


@functools.cache
def model() -> ContextBLIP:
    return ContextBLIP(tiny_contextblip(context=ContextConfig(dropout=0.0)), rngs=nnx.Rngs(0))


@functools.cache
def per_description_step(stage_name: str) -> tuple[dict, dict]:
    return one_step(stage_name, per_description(), 1)


def one_step(stage_name: str, batch: dict[str, np.ndarray], accum_steps: int) -> tuple[dict, dict]:
    """(parameters after one SGD step at rate 1, metrics): the update is minus the gradient."""
    stage = stages.get(stage_name)
    spec, trainable, frozen = split_model(model(), stage.trainable_filter())
    tx = optax.sgd(1.0)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
    step = jax.jit(make_train_step(spec, stage, base_config().loss, tx, seed=0, accum_steps=accum_steps))
    fields = {name: jnp.asarray(value) for name, value in batch.items() if name != "sets"}
    after, metrics = step(state, fields)
    return jax.device_get(after.trainable), jax.device_get(metrics)


@pytest.mark.parametrize(("stage", "accum_steps"), [("finetune", 1), ("finetune", 2), ("context", 2)])
def test_a_grouped_step_has_the_loss_and_gradients_of_the_per_description_step(stage, accum_steps):
    expected, expected_metrics = per_description_step(stage)
    params, metrics = one_step(stage, grouped(per_description()), accum_steps)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    chex.assert_trees_all_close(params, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["grad_norm"], expected_metrics["grad_norm"], rtol=1e-5)
    assert metrics["accuracy"] == pytest.approx(expected_metrics["accuracy"])
    assert metrics["filled"] == pytest.approx(len(TARGETS) / len(SLOTS))
    assert expected_metrics["filled"] == 1.0


def test_grouped_micro_batches_take_whole_groups_by_stride():
    batch = grouped(per_description())
    micro = micro_batches({name: jnp.asarray(value) for name, value in batch.items()}, 2)
    np.testing.assert_array_equal(micro[stages.SET_INDEX][1], [SET_INDEX[1]])
    np.testing.assert_array_equal(micro["images"][1], batch["images"][2:])
    np.testing.assert_array_equal(micro["target"][0], batch["target"][:4])
    with pytest.raises(ValueError, match="3 micro-batches"):
        micro_batches({name: jnp.asarray(value) for name, value in batch.items()}, 3)


def test_padding_slots_add_nothing_to_the_loss():
    batch = grouped(per_description())
    batch["target"] = np.full_like(batch["target"], -1)
    _, metrics = one_step("finetune", batch, 1)
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0 and metrics["filled"] == 0.0
