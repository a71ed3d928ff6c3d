"""The grain pipeline: batch layout, per-host shards, seeded order, resumable state, skip policy, config."""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil

import chex
import ml_collections
import numpy as np
import pytest

from contextblip_jax.data import imagecode, pipeline
from contextblip_jax.data.errors import DataError
from contextblip_jax.data.preprocess import ENC_ID

AUGMENT = {"random_resized_crop": True, "randaugment_layers": 2, "flip": "text_aware"}


def config(root: str, **overrides) -> pipeline.DataConfig:
    values = {"root": root, "image_size": 16, "max_text_length": 16, "batch_size": 4, "threads": 2, "prefetch": 4}
    return pipeline.DataConfig.from_config(None, **{**values, **overrides})


def take(dataset, n: int) -> list[dict[str, np.ndarray]]:
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["example_id"]]


def test_batch_layout(generated_root):
    batch = take(pipeline.imagecode_dataset(config(generated_root, augment=AUGMENT), "train", train=True), 1)[0]
    chex.assert_shape(batch["images"], (4, 10, 16, 16, 3))
    chex.assert_shape([batch["input_ids"], batch["attention_mask"]], (4, 16))
    chex.assert_shape([batch["target"], batch["is_video"], batch["example_id"]], (4,))
    assert batch["images"].dtype == np.float32 and batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["target"].dtype == np.int32 and batch["is_video"].dtype == np.bool_
    assert (batch["input_ids"][:, 0] == ENC_ID).all() and (batch["attention_mask"][:, 0] == 1).all()
    source = imagecode.ImageCodeSource(generated_root, "train")
    for i, target, video in zip(batch["example_id"], batch["target"], batch["is_video"], strict=True):
        assert (source.examples[i].target, source.examples[i].is_video) == (target, video)


def test_evaluation_sees_each_example_once_then_padding(generated, tmp_path):
    root, counts = generated
    n = counts["valid"]["descriptions"]
    batches = list(pipeline.imagecode_dataset(config(root, batch_size=3), "valid", train=False))
    assert all(b["example_id"].shape == (3,) for b in batches)
    assert ids(batches) == list(range(n)) + [-1] * (-n % 3)
    padded = np.concatenate([b["example_id"] for b in batches]) < 0
    assert (np.concatenate([b["images"] for b in batches])[padded] == 0).all()
    assert (np.concatenate([b["target"] for b in batches])[padded] == -1).all()


def test_test_split_batches_carry_no_targets(generated_root):
    batches = list(pipeline.imagecode_dataset(config(generated_root), "test", train=False))
    assert (np.concatenate([b["target"] for b in batches]) == -1).all()


def test_hosts_split_each_global_batch(generated_root):
    single = take(pipeline.imagecode_dataset(config(generated_root), "train", train=True), 4)
    hosts = [take(pipeline.imagecode_dataset(config(generated_root), "train", True, index, 2), 4) for index in (0, 1)]
    for step in range(4):
        local = [h[step]["example_id"] for h in hosts]
        assert all(ids.shape == (2,) for ids in local)
        assert sorted(np.concatenate(local).tolist()) == sorted(single[step]["example_id"].tolist())
    for index in (0, 1):
        evaluation = list(pipeline.imagecode_dataset(config(generated_root), "valid", False, index, 2))
        hosts[index] = ids(evaluation)
    assert len(hosts[0]) == len(hosts[1]) and not set(hosts[0]) & set(hosts[1]) - {-1}
    n = len(imagecode.read_split(generated_root, "valid"))
    assert sorted(i for i in hosts[0] + hosts[1] if i >= 0) == list(range(n))
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        pipeline.imagecode_dataset(config(generated_root), "train", True, 0, 3)


def test_shuffle_is_seeded_and_changes_every_epoch(generated):
    root, counts = generated
    n = counts["train"]["descriptions"]
    first = ids(take(pipeline.imagecode_dataset(config(root, batch_size=1), "train", train=True), 2 * n))
    again = ids(take(pipeline.imagecode_dataset(config(root, batch_size=1), "train", train=True), 2 * n))
    other = ids(take(pipeline.imagecode_dataset(config(root, batch_size=1, seed=1), "train", train=True), n))
    assert first == again and first[:n] != other
    assert sorted(first[:n]) == sorted(first[n:]) == list(range(n)) and first[:n] != first[n:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_from_saved_state_gives_the_same_batches(generated_root, workers):
    """With workers=2 this also shows that worker processes change nothing (the reference decodes in-process)."""
    uninterrupted = take(pipeline.imagecode_dataset(config(generated_root, augment=AUGMENT), "train", train=True), 7)
    cfg = config(generated_root, workers=workers, augment=AUGMENT)
    iterator = iter(pipeline.imagecode_dataset(cfg, "train", train=True))
    head = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    iterator.close()
    resumed = iter(pipeline.imagecode_dataset(cfg, "train", train=True))
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(4)]
    resumed.close()
    chex.assert_trees_all_equal(head + rest, uninterrupted)


@pytest.fixture
def truncated(generated_root, tmp_path) -> tuple[str, set[int], set[int]]:
    """A copy with one image of a train set and of a valid set cut in half; (root, damaged train ids, valid ids)."""
    root = str(tmp_path / "copy")
    shutil.copytree(generated_root, root)
    damaged = []
    for split in ("train", "valid"):
        examples = imagecode.read_split(root, split)
        path = examples[1].image_paths[5]
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        damaged.append({i for i, e in enumerate(examples) if e.set_name == examples[1].set_name})
    return root, damaged[0], damaged[1]


def test_undecodable_image_raises_or_is_skipped(truncated, caplog):
    root, bad_train, bad_valid = truncated
    with pytest.raises(DataError, match="cannot decode JPEG") as raised:
        list(pipeline.imagecode_dataset(config(root, batch_size=1), "valid", train=False))
    assert "img" in raised.value.path and raised.value.set_name in raised.value.path
    n = len(imagecode.read_split(root, "train"))
    with caplog.at_level(logging.WARNING):
        epoch = take(pipeline.imagecode_dataset(config(root, on_error="skip", batch_size=1), "train", True), n)
    assert set(ids(epoch)) == set(range(n)) - bad_train  # damaged ones replaced by others: batches stay full
    assert {int(i) for i in re.findall(r"skipped example (\d+)", caplog.text)} == bad_train
    evaluation = ids(pipeline.imagecode_dataset(config(root, on_error="skip"), "valid", train=False))
    assert len(evaluation) % 4 == 0
    valid = [i for i in evaluation if i >= 0]
    assert valid == sorted(set(range(len(imagecode.read_split(root, "valid")))) - bad_valid)


def test_config_from_ml_collections_and_unknown_fields():
    cfg = ml_collections.ConfigDict({"data": {"root": "/r", "batch_size": 8, "augment": {"flip": "text_aware"}}})
    data = pipeline.DataConfig.from_config(cfg)
    assert (data.root, data.batch_size, data.augment.flip, data.max_text_length, data.image_size) == (
        "/r",
        8,
        "text_aware",
        64,
        224,
    )
    assert pipeline.DataConfig(augment={"randaugment_layers": 2}).augment.randaugment_layers == 2
    with pytest.raises(ValueError, match="batchsize"):
        pipeline.DataConfig.from_config({"batchsize": 8})
    with pytest.raises(ValueError, match="flipp"):
        pipeline.DataConfig.from_config({"augment": {"flipp": "off"}})
    with pytest.raises(ValueError, match="on_error"):
        pipeline.DataConfig.from_config({"on_error": "ignore"})


def test_images_deleted_after_the_run_started_are_named_or_skipped_and_counted(generated_root, tmp_path):
    """The source is built (annotations read, files listed) as a run starts; then one set's images disappear.
    Raising names the set; skipping replaces each damaged example and counts every failed read in `skipped`."""
    root = str(tmp_path / "copy")
    shutil.copytree(generated_root, root)
    examples = imagecode.read_split(root, "train")
    gone = collections.Counter(e.set_name for e in examples).most_common(1)[0][0]
    bad = {i for i, e in enumerate(examples) if e.set_name == gone}
    raising = pipeline.imagecode_dataset(config(root, batch_size=1), "train", True)
    skipping = pipeline.imagecode_dataset(config(root, batch_size=1, on_error="skip"), "train", True)
    shutil.rmtree(os.path.join(root, imagecode.IMAGE_DIR, gone))

    with pytest.raises(DataError, match="cannot read image") as raised:
        take(raising, len(examples))
    assert raised.value.set_name == gone and gone in raised.value.path
    epoch = take(skipping, len(examples))
    assert set(ids(epoch)).isdisjoint(bad) and all(len(b["example_id"]) == 1 for b in epoch)
    # A set's examples are consecutive, and a damaged one is replaced by the next: visiting the k-th last of the
    # set's m examples fails k times before a readable one is found, m(m+1)/2 failures in all.
    m = len(bad)
    assert bad == set(range(min(bad), min(bad) + m)) and m >= 2
    assert sum(int(b["skipped"].sum()) for b in epoch) == m * (m + 1) // 2
