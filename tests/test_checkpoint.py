"""A run's checkpoints in-process: the train state and the data iterator's position survive a round trip."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.checkpoint import RunCheckpoints
from contextblip_jax.step import TrainState


def iterator():
    return iter(grain.MapDataset.range(1000).seed(7).shuffle().batch(4).to_iter_dataset())


def state(scale: float) -> TrainState:
    return TrainState(
        step=jnp.asarray(5, jnp.int32),
        trainable={"head.proj.kernel": jnp.arange(6.0).reshape(3, 2) * scale},
        frozen={"blip.vision.cls_token": jnp.full((1, 1, 4), scale)},
        opt_state=({"head.proj.kernel": jnp.ones((3, 2)) * scale}, jnp.asarray(3, jnp.int32)),
    )


def test_state_and_data_position_round_trip(tmp_path):
    data = iterator()
    for _ in range(5):
        next(data)
    saved = state(2.0)
    checkpoints = RunCheckpoints(str(tmp_path), keep=2)
    checkpoints.save(5, saved, data)
    checkpoints.close()
    expected_batches = [next(data) for _ in range(3)]

    reopened = RunCheckpoints(str(tmp_path))
    assert reopened.latest_step() == 5
    fresh = iterator()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0.0))
    restored = reopened.restore(5, abstract, fresh)
    params = reopened.restore_params(5)
    reopened.close()

    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    for expected in expected_batches:  # the iterator continues where the saved one stood
        np.testing.assert_array_equal(next(fresh), expected)
    assert sorted(params) == ["blip.vision.cls_token", "head.proj.kernel"]
    np.testing.assert_array_equal(params["head.proj.kernel"], np.arange(6.0).reshape(3, 2) * 2.0)


def test_only_the_newest_are_kept(tmp_path):
    data = iterator()
    checkpoints = RunCheckpoints(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        next(data)
        checkpoints.save(step, state(float(step)), data)
    checkpoints.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
