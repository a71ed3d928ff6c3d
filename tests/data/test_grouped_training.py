"""Grouped training batches (`pipeline.grouped_train_dataset`): one augmentation draw per set slot shared by its
descriptions, the same batches on any host count and after a resume, damaged sets skipped as padding."""

from __future__ import annotations

import logging
import os
import shutil

import chex
import numpy as np
import pytest

from contextblip_jax.data import augment, grouped, imagecode, pipeline, transforms
from contextblip_jax.data.errors import SKIPPED_FIELD

SET_INDEX = grouped.SET_INDEX


def config(root: str, **overrides) -> pipeline.DataConfig:
    values = {"root": root, "image_size": 16, "max_text_length": 16, "batch_size": 8, "group_by_set": True}
    return pipeline.DataConfig.from_config(None, **{**values, **overrides})


def batches(cfg: pipeline.DataConfig, layout: grouped.Layout, n: int, **shard) -> list[dict[str, np.ndarray]]:
    iterator = iter(pipeline.grouped_train_dataset(cfg, pipeline.imagecode_source(cfg, "train"), layout, **shard))
    out = [next(iterator) for _ in range(n)]
    iterator.close()
    return out


def test_a_flip_drawn_for_a_set_mirrors_its_images_and_every_description(generated_root):
    layout = grouped.Layout.of(8, 2, 4, section="data")
    flipped = config(generated_root, augment={"flip": "text_aware", "flip_probability": 1.0}, shuffle=False)
    batch = batches(flipped, layout, 1)[0]
    source = pipeline.imagecode_source(flipped, "train")
    plain = transforms.PrepareImageCode(16, 16)
    tokenizer = transforms.PrepareImageCode(16, 16)
    set_of = batch[SET_INDEX] + np.arange(layout.groups)[:, None] * layout.set_slots
    for row, (example_id, slot) in enumerate(zip(batch["example_id"], set_of.reshape(-1), strict=True)):
        if example_id < 0:
            continue
        record = source[int(example_id)]
        np.testing.assert_allclose(batch["images"][slot], plain(record)["images"][:, :, ::-1], atol=1e-6)
        ids, _ = tokenizer.tokenize(augment.flip_text(record["description"]))
        np.testing.assert_array_equal(batch["input_ids"][row], ids)
        assert batch["target"][row] == record["target"]


def test_hosts_split_each_global_batch_into_its_groups(generated_root):
    cfg = config(generated_root, augment={"random_resized_crop": True, "flip": "text_aware"})
    layout = grouped.Layout.of(8, 2, 4, section="data")
    whole = batches(cfg, layout, 3)
    parts = [batches(cfg, layout, 3, shard_index=i, shard_count=2) for i in range(2)]
    for step, batch in enumerate(whole):
        for name, value in batch.items():
            halves = [part[step][name] for part in parts]
            np.testing.assert_array_equal(np.concatenate(halves), value, err_msg=f"{name} at batch {step}")


def test_resuming_from_saved_state_gives_the_same_batches(generated_root):
    """In the main process; worker processes read pickled copies of the plan (`test_set_sampler.py`)."""
    layout = grouped.Layout.of(8, 1, 3, section="data")
    augmented = {"random_resized_crop": True, "randaugment_layers": 2, "flip": "text_aware"}
    uninterrupted = batches(config(generated_root, augment=augmented), layout, 6)
    cfg = config(generated_root, augment=augmented)
    source = pipeline.imagecode_source(cfg, "train")
    iterator = iter(pipeline.grouped_train_dataset(cfg, source, layout))
    head = [next(iterator) for _ in range(2)]
    state = iterator.get_state()
    iterator.close()
    resumed = iter(pipeline.grouped_train_dataset(cfg, source, layout))
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(4)]
    resumed.close()
    chex.assert_trees_all_equal(head + rest, uninterrupted)


def test_a_damaged_set_becomes_padding_and_counts_its_descriptions(generated_root, tmp_path, caplog):
    root = str(tmp_path / "copy")
    shutil.copytree(generated_root, root)
    examples = imagecode.read_split(root, "train")
    path = examples[0].image_paths[3]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    damaged = {i for i, e in enumerate(examples) if e.set_name == examples[0].set_name}
    sets = len({e.set_name for e in examples})
    layout = grouped.Layout.of(len(examples), 1, sets, section="data")  # one group: exactly the first epoch
    with pytest.raises(Exception, match="cannot decode JPEG"):
        batches(config(root, batch_size=layout.description_slots, shuffle=False), layout, 1)
    with caplog.at_level(logging.WARNING):
        cfg = config(root, batch_size=layout.description_slots, shuffle=False, on_error="skip")
        batch = batches(cfg, layout, 1)[0]
    seen = {int(i) for i in batch["example_id"] if i >= 0}
    assert seen == set(range(len(examples))) - damaged
    assert int(np.sum(batch[SKIPPED_FIELD])) == len(damaged)
    assert "damaged set" in caplog.text


def test_grouping_needs_one_draw_per_example_and_the_folder_source(generated_root):
    with pytest.raises(ValueError, match="per_image"):
        config(generated_root, augment={"per_image": True, "flip": "plain"})
    records = config(generated_root, source="tfds", tfds_dir=generated_root)
    with pytest.raises(ValueError, match="folder"):
        pipeline.grouped_train_dataset(records, object(), grouped.Layout.of(8, 1, 4, section="data"))
