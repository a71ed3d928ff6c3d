"""A checkpoint write that runs out of disk space stops the run naming the folder; the checkpoint before it stays
restorable, and once space is freed the same run resumes from it.

The disk is real: a small tmpfs mounted for the test (root only, as on CI; elsewhere the test says why it skips),
filled with a ballast file until a checkpoint no longer fits."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest

from contextblip_jax import storage, train
from contextblip_jax.checkpoints import run_state
from contextblip_jax.training.telemetry import read_metrics
from tests.runs import run_config

FREE_BYTES = 256 * 1024  # left after the ballast: room for metrics rows, not for a checkpoint (about 5 MB)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.long
def test_a_full_disk_stops_the_run_naming_the_folder_and_the_run_resumes_once_space_is_freed(
    small_disk, data_root, caplog
):
    workdir = str(small_disk / "run")
    config = run_config(data_root, total_steps=2, log_every=1, checkpoint_every=2, eval__splits=())
    train.train(config, workdir)
    ballast = small_disk / "ballast"
    stat = os.statvfs(small_disk)
    ballast.write_bytes(bytes(stat.f_bavail * stat.f_frsize - FREE_BYTES))

    config.total_steps = 4
    with pytest.raises(storage.CheckpointWriteError) as raised:
        train.train(config, workdir)
    message = str(raised.value)
    assert f"{workdir}/checkpoints" in message and "no space left on device" in message
    assert "checkpoint 2 is the newest complete one" in message

    ballast.unlink()
    caplog.set_level(logging.INFO)
    train.train(config, workdir)
    assert any("resumed from step 2" in r.getMessage() for r in caplog.records)
    assert sorted(r["step"] for r in read_metrics(workdir) if r["split"] == "train") == [1, 2, 3, 4]
    assert run_state.RunCheckpoints(workdir).latest_step() == 4
