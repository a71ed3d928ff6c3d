"""The data layer owns the data: one call gives a stage's training batches (its fields only) and the epoch size,
whichever source the config names; evaluators read their split once."""

from __future__ import annotations

import json
import os

import numpy as np

from contextblip_jax import parallel, stages
from contextblip_jax.data import imagecode, records
from contextblip_jax.evaluation.evaluators import build_evaluators
from contextblip_jax.training import inputs
from tests.runs import run_config


def test_folder_and_records_give_the_same_batches_and_epoch(generated, tmp_path):
    root, counts = generated
    data_dir = str(tmp_path / "tfds")
    records.build_imagecode(root, data_dir)
    stage = stages.get("finetune")
    folder = inputs.train_input(run_config(root, data__synthetic=0), stage)
    records_config = run_config(root, data__synthetic=0, data__source="tfds", data__tfds_dir=data_dir)
    stored = inputs.train_input(records_config, stage)
    assert folder.examples_per_epoch == stored.examples_per_epoch == counts["train"]["descriptions"]
    batch, other = next(iter(folder.dataset)), next(iter(stored.dataset))
    assert tuple(batch) == (*stage.batch_fields, "skipped")  # the trainer counts and drops `skipped`
    for name in stage.batch_fields:
        np.testing.assert_array_equal(batch[name], other[name])
    assert batch["images"].shape == (8, 10, 32, 32, 3)


def test_stage_one_reads_the_generated_captions(tmp_path):
    root = str(tmp_path / "fresh")  # the main job generates its data, then the captions of its training targets
    train = inputs.train_input(run_config(root, stage="pretrain"), stages.get("pretrain"))
    with open(os.path.join(root, inputs.SYNTHETIC_CAPTIONS)) as f:
        captions = json.load(f)
    assert train.examples_per_epoch == len({entry["image"] for entry in captions}) > 0
    batch = next(iter(train.dataset))
    assert tuple(batch) == (*stages.CAPTION_FIELDS, "skipped") and batch["images"].shape == (8, 32, 32, 3)


def test_evaluators_read_their_split_once(generated_root, monkeypatch):
    calls = []
    read_split = imagecode.read_split
    monkeypatch.setattr(imagecode, "read_split", lambda *args, **kw: calls.append(args) or read_split(*args, **kw))
    mesh = parallel.make_mesh((-1, 1, 1))
    config = run_config(generated_root, data__synthetic=0)
    (evaluator,) = build_evaluators(config, stages.get("finetune"), mesh)
    assert build_evaluators(config, stages.get("pretrain"), mesh) == []

    def predict(batch):
        return np.eye(10, dtype=np.float32)[np.zeros(batch["target"].shape, int)]  # always candidate 0

    first, second = evaluator.run(predict, 1), evaluator.run(predict, 2)
    assert len(calls) == 1
    targets = [e.target for e in imagecode.read_split(generated_root, "valid")]
    assert first["acc"] == second["acc"] == np.mean(np.array(targets) == 0)
    assert (first["step"], second["step"], first["split"]) == (1, 2, "valid")
