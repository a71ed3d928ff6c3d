"""Runs whose workdir is `gs://` (a local Cloud Storage: tests/gcs_server.py): they train, evaluate and chain as a
local run does, survive kills, and a storage failure while restoring stops the run with nothing set aside."""

from __future__ import annotations

import json
import os
import subprocess

import chex
import pytest
from etils import epath

from contextblip_jax import files, storage, train
from contextblip_jax.checkpoints import run_state
from tests.gcs_server import Faults
from tests.reliability import kills
from tests.runs import ROOT, run_config

SETTINGS = {"log_every": 1, "checkpoint_every": 2, "eval_every": 4, "eval__splits": ("valid",)}


def trained(workdir: str, data_root: str, steps: int, **overrides) -> dict:
    return train.train(run_config(data_root, total_steps=steps, **SETTINGS, **overrides), workdir)


@pytest.mark.long
def test_a_run_on_cloud_storage_equals_a_local_one_and_evaluates_and_chains_from_there(gcs, data_root, tmp_path):
    remote, local = gcs.url("run"), str(tmp_path / "local")
    summary = trained(remote, data_root, 6)
    trained(local, data_root, 6)
    chex.assert_trees_all_equal(kills.final_state(remote, 6), kills.final_state(local, 6))
    assert kills.comparable_rows(remote) == kills.comparable_rows(local)
    assert summary["metrics"] == f"{remote}/metrics.jsonl" and summary["plot"] == f"{remote}/curves.png"
    for name in ("best.json", "model_config.json", "curves.png"):
        assert files.exists(files.join(remote, name)), name
    assert [p.name.startswith("events.out.tfevents") for p in epath.Path(remote, "tensorboard").iterdir()] == [True]
    assert not files.exists(files.join(remote, "lock.json"))  # released at the end

    evaluated = subprocess.run(
        [
            "python", "-m", "contextblip_jax.evaluate", "--config=configs/synthetic.py:stage=finetune,variant=tiny",
            f"--workdir={remote}", f"--config.data.root={data_root}", "--config.data.synthetic=12",
            "--config.eval.batch_size=8",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads(evaluated.stdout.strip().splitlines()[-1])
    best = json.loads(files.read_text(files.join(remote, "best.json")))
    assert (scored["step"], scored["acc"]) == (best["step"], best["row"]["acc"])

    images = os.path.join(data_root, "image-sets", sorted(os.listdir(os.path.join(data_root, "image-sets")))[0])
    predicted = subprocess.run(
        ["python", "-m", "contextblip_jax.predict", f"--workdir={remote}", f"--images={images}", "--stage=finetune",
         "--text=a red circle"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(json.loads(predicted.stdout[predicted.stdout.index("{") :])["ranking"]) == 10

    chained = trained(gcs.url("context"), data_root, 2, stage="context", init=remote)
    assert files.exists(chained["metrics"])


@pytest.mark.long
def test_a_run_on_cloud_storage_killed_three_times_ends_exactly_as_an_uninterrupted_local_one(gcs, data_root, tmp_path):
    workdir = gcs.url("interrupted")
    report = kills.run(kills=3, terms=1, seed=0, data_root=data_root, base=str(tmp_path), steps=12, workdir=workdir)
    assert report["kills"] == 3 and report["rows_compared"] >= 12
    assert report["lock_takeovers"] == report["locks_left"] >= 2  # the next run took each lock a kill left at once
    assert report["locks_left_by_sigterm"] == 0  # a preempted run releases its lock as it exits


@pytest.mark.long
def test_a_storage_failure_while_restoring_moves_nothing_and_a_rerun_resumes(gcs, data_root, tmp_path, monkeypatch):
    """A run of 4 steps continued to 6 (the 6-step schedule from step 4 on), against the same done without faults."""
    remote, reference = gcs.url("run"), str(tmp_path / "reference")
    trained(remote, data_root, 4)
    monkeypatch.setattr(run_state, "READ_RETRY_DELAYS_S", (0.1, 0.1))
    gcs.set_faults(Faults(rate=1.0, kinds=("403",), names=r"/checkpoints/4/state/"))
    with pytest.raises(storage.CheckpointReadError, match=rf"checkpoint 4 in {remote}/checkpoints could not be read"):
        trained(remote, data_root, 6)
    assert gcs.counts()["403"] >= 3  # every try met the failure
    gcs.set_faults(None)
    assert sorted(p.name for p in epath.Path(remote, "checkpoints").iterdir()) == ["2", "4"]  # nothing set aside

    trained(remote, data_root, 6)
    trained(reference, data_root, 4)
    trained(reference, data_root, 6)
    chex.assert_trees_all_equal(kills.final_state(remote, 6), kills.final_state(reference, 6))
    assert kills.comparable_rows(remote) == kills.comparable_rows(reference)
