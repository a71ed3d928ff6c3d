"""Images that disappear while a run is training: skipped and counted with `data.on_error="skip"`, and the count
in metrics.jsonl continues across a resume. (Raising instead, naming the set: tests/data/test_pipeline.py.)"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from contextblip_jax import train
from contextblip_jax.checkpoints import run_state
from contextblip_jax.data import imagecode
from contextblip_jax.training.skipped import METRIC
from contextblip_jax.training.telemetry import read_metrics
from tests.runs import run_config


def train_rows(workdir: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(workdir) if r["split"] == "train"}


@pytest.mark.long
def test_images_deleted_mid_run_are_skipped_counted_and_the_count_survives_a_resume(tmp_path, data_root):
    root, workdir, away = str(tmp_path / "data"), str(tmp_path / "run"), tmp_path / "away"
    shutil.copytree(data_root, root)
    sets = sorted({e.set_name for e in imagecode.read_split(root, "train")})
    config = run_config(root, total_steps=12, log_every=1, eval__splits=(), data__on_error="skip")

    def delete_half_the_sets_after_the_first_step() -> None:
        deadline = time.time() + 300
        while not train_rows(workdir) and time.time() < deadline:
            time.sleep(0.02)
        away.mkdir()
        for name in sets[::2]:
            shutil.move(os.path.join(root, imagecode.IMAGE_DIR, name), away / name)

    vandal = threading.Thread(target=delete_half_the_sets_after_the_first_step)
    vandal.start()
    train.train(config, workdir)
    vandal.join()
    rows = train_rows(workdir)
    counts = [rows[step][METRIC] for step in sorted(rows)]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] > 0, counts

    for moved in away.iterdir():  # the images come back; the resumed run skips nothing new
        shutil.move(moved, os.path.join(root, imagecode.IMAGE_DIR, moved.name))
    config.total_steps = 14
    train.train(config, workdir)
    rows = train_rows(workdir)
    assert sorted(rows) == list(range(1, 15))
    assert rows[13][METRIC] == rows[14][METRIC] == counts[-1]
    stored = run_state.RunCheckpoints(workdir)
    assert stored.latest_step() == 14
