"""A run's checkpoints in-process: the train state and the data iterator's position survive a round trip, a
damaged checkpoint is named and passed over for the newest intact one, and parameters are read into the
shardings asked for (on 8 devices: tests/test_sharded_init.py)."""

from __future__ import annotations

import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from contextblip_jax.checkpoints.best import BestParams
from contextblip_jax.checkpoints.run_state import RunCheckpoints
from contextblip_jax.storage import DamagedCheckpointError, restore_params, save_params
from contextblip_jax.training.step import TrainState


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
    checkpoints.save(5, saved, data, {"skipped_examples": 7})
    checkpoints.close()
    expected_batches = [next(data) for _ in range(3)]

    reopened = RunCheckpoints(str(tmp_path))
    assert reopened.latest_step() == 5
    fresh = iterator()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0.0))
    restored, counters = reopened.restore(5, abstract, fresh)
    params = reopened.restore_params(5)
    reopened.close()

    jax.tree.map(np.testing.assert_array_equal, restored, saved)
    assert counters == {"skipped_examples": 7}
    for expected in expected_batches:  # the iterator continues where the saved one stood
        np.testing.assert_array_equal(next(fresh), expected)
    assert sorted(params) == ["blip.vision.cls_token", "head.proj.kernel"]
    np.testing.assert_array_equal(params["head.proj.kernel"], np.arange(6.0).reshape(3, 2) * 2.0)


def test_checkpoints_written_without_counters_restore_with_none(tmp_path):
    """A run checkpointed before counters were stored (state and data items only) still resumes."""
    data = iterator()
    older = ocp.CheckpointManager(
        str(tmp_path / "checkpoints"),
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
    )
    items = {"state": ocp.args.StandardSave(state(1.0)), "data": grain.checkpoint.CheckpointSave(data)}
    older.save(1, args=ocp.args.Composite(**items))
    older.close()
    step, restored, counters = RunCheckpoints(str(tmp_path)).restore_latest(abstract(), iterator())
    assert (step, counters) == (1, {})
    jax.tree.map(np.testing.assert_array_equal, restored, state(1.0))


def test_only_the_newest_are_kept(tmp_path):
    data = iterator()
    checkpoints = RunCheckpoints(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        next(data)
        checkpoints.save(step, state(float(step)), data)
    checkpoints.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]


def two_checkpoints(root) -> list:
    """Steps 1 and 2 of a run (states scaled 1 and 2), and the batches that follow each step's data position."""
    data, following = iterator(), []
    checkpoints = RunCheckpoints(str(root), keep=3)
    for step in (1, 2):
        next(data)
        checkpoints.save(step, state(float(step)), data)
        following.append(next(iter_copy(data)))
    checkpoints.close()
    return following


def iter_copy(data):
    copy = iterator()
    copy.set_state(data.get_state())
    return copy


def array_files(step_dir) -> list:
    return [p for p in step_dir.glob("state/**/d/*") if p.is_file()]


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated arrays": lambda step: [truncate(p) for p in array_files(step)],
    "deleted arrays": lambda step: [p.unlink() for p in array_files(step)],
    "garbled metadata": lambda step: (step / "state" / "_METADATA").write_text("{not json"),
    "garbled data position": lambda step: next(step.glob("data/*.json")).write_bytes(b"\0garbage"),
}


def abstract() -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0.0))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_one_before_restored(tmp_path, damage, caplog):
    following = two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    DAMAGE[damage](folder / "2")
    checkpoints = RunCheckpoints(str(tmp_path))
    data = iterator()
    step, restored, _ = checkpoints.restore_latest(abstract(), data)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, state(1.0))
    np.testing.assert_array_equal(next(data), following[0])  # the data position is step 1's too
    assert any("checkpoint 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    aside = [p.name for p in folder.iterdir() if p.name.startswith("damaged-2-")]
    assert len(aside) == 1 and not (folder / "2").exists()  # kept for inspection, out of Orbax's way
    checkpoints.save(2, state(5.0), data)  # the step can be written again
    checkpoints.close()
    assert RunCheckpoints(str(tmp_path)).latest_step() == 2


def test_a_half_written_temporary_folder_is_ignored_and_left_alone(tmp_path):
    two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    shutil.copytree(folder / "2", folder / "3.orbax-checkpoint-tmp")
    truncate(array_files(folder / "3.orbax-checkpoint-tmp")[0])
    step, restored, _ = RunCheckpoints(str(tmp_path)).restore_latest(abstract(), iterator())
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, restored, state(2.0))
    assert (folder / "3.orbax-checkpoint-tmp").is_dir()


def test_when_every_checkpoint_is_damaged_the_run_stops_naming_each_and_moves_nothing(tmp_path):
    two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints"
    DAMAGE["garbled metadata"](folder / "2")
    DAMAGE["deleted arrays"](folder / "1")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(DamagedCheckpointError, match=r"step 2: .*step 1: .*move .* away"):
        RunCheckpoints(str(tmp_path)).restore_latest(abstract(), iterator())
    assert sorted(p.name for p in folder.iterdir()) == before


def test_parameters_for_a_next_stage_come_from_the_newest_intact_checkpoint_and_nothing_moves(tmp_path):
    two_checkpoints(tmp_path)
    DAMAGE["truncated arrays"](tmp_path / "checkpoints" / "2")
    step, params = RunCheckpoints(str(tmp_path)).latest_params()
    assert step == 1 and (tmp_path / "checkpoints" / "2").is_dir()
    np.testing.assert_array_equal(params["head.proj.kernel"], np.arange(6.0).reshape(3, 2))


def test_parameters_are_read_into_the_shardings_asked_for_and_the_others_to_the_host(tmp_path):
    """From a run's checkpoint, its best parameters and a converted folder alike."""
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    saved = state(2.0)
    two_checkpoints(tmp_path)
    store = BestParams(str(tmp_path))
    store.save(2, {**saved.trainable, **saved.frozen})
    save_params(str(tmp_path / "converted"), {**saved.trainable, **saved.frozen})
    checkpoints = RunCheckpoints(str(tmp_path))
    wanted = {"head.proj.kernel": sharding}
    reads = {
        "run": checkpoints.restore_params(2, wanted),
        "latest": checkpoints.latest_params(wanted)[1],
        "best": store.restore_params(2, wanted),
        "converted": restore_params(str(tmp_path / "converted"), wanted),
    }
    checkpoints.close()
    store.close()
    for where, params in reads.items():
        kernel, token = params["head.proj.kernel"], params["blip.vision.cls_token"]
        assert isinstance(kernel, jax.Array) and kernel.sharding == sharding, where
        assert isinstance(token, np.ndarray), where
        np.testing.assert_array_equal(kernel, saved.trainable["head.proj.kernel"])
        np.testing.assert_array_equal(token, saved.frozen["blip.vision.cls_token"])
