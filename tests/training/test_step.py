"""The pure train step in-process: gradient accumulation and frozen parameters, on the tiny model.

Where the micro-batches lie on 8 devices is checked in a child process with 8 simulated CPU devices, which runs
this file as a script (`python -m tests.training.test_step`) and prints what it measured as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from contextblip_jax import losses, parallel, stages
from contextblip_jax.compile import aot
from contextblip_jax.models.config import AdapterConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training.step import (
    TrainState,
    make_predict_step,
    make_train_step,
    micro_batch_groups,
    micro_batches,
    split_model,
)
from tests.runs import ROOT, device_env
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

    def loss(model, batch, key, config, groups=1):
        del key, config, groups
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


def test_each_micro_batch_holds_every_devices_share_in_device_order():
    """16 examples on 4 devices (blocks of 4), 2 micro-batches: each micro-batch's `micro_batch_groups`
    consecutive blocks are the 4 devices' shares, in device order, as per-device hard negatives need."""
    device = np.arange(16) // 4
    micro = np.asarray(micro_batches({"example": jnp.arange(16)}, 2)["example"])
    groups = micro_batch_groups(4, 2, 16)
    assert micro.shape == (2, 8) and sorted(micro.ravel()) == list(range(16))
    for examples in micro:
        np.testing.assert_array_equal(device[examples], np.repeat(np.arange(groups), 2))  # 2 per device
    assert micro_batch_groups(1, 3, 6) == 1
    with pytest.raises(ValueError, match="grad_accum_steps 3 to divide each of the 4 batch shards"):
        micro_batch_groups(4, 3, 16)


def linear_loss(
    model: nnx.Linear, batch: stages.Batch, key: jax.Array, config: Any, groups: int = 1
) -> tuple[jax.Array, dict]:
    """A loss of a linear layer summed over examples: its replicated parameters need no collective but the
    gradient's all-reduce, so any other collective in its train step moves micro-batches."""
    del key, config, groups
    return jnp.tanh(model(batch["x"])).sum(), {}


def accumulation_collectives(accum_steps: int) -> dict[str, int]:
    """The collectives of the train step compiled for a batch of 32 sharded over data 2 × fsdp 4 devices."""
    mesh = parallel.make_mesh((2, 4, 1))
    spec, trainable, frozen = split_model(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Param)
    stage = dataclasses.replace(stages.get("finetune"), loss=linear_loss)
    tx = optax.sgd(1.0)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), state)
    step = make_train_step(spec, stage, base_config().loss, tx, seed=0, accum_steps=accum_steps)
    jitted = jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh, 2)))
    batch = {"x": jax.ShapeDtypeStruct((32, 4), jnp.float32)}
    return aot.count_collectives(jitted.lower(state, batch).compile().as_text())


def test_every_micro_batch_stays_on_all_8_devices():
    """Micro-batches taken by stride keep each device's share of the batch, so accumulating moves no example:
    the step has the gradient's all-reduce and nothing else. (Consecutive micro-batches each lie on a subset
    of the devices, and XLA all-gathers them: this fails with `x.reshape(accum_steps, -1, ...)`.)"""
    done = subprocess.run(
        [sys.executable, "-m", "tests.training.test_step"], cwd=ROOT, env=device_env(8), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    for accum_steps, collectives in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert collectives["all-reduce"] >= 1, (accum_steps, collectives)
        assert sum(collectives.values()) == collectives["all-reduce"], (accum_steps, collectives)


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    print(json.dumps({accum_steps: accumulation_collectives(accum_steps) for accum_steps in (1, 2, 4)}))
