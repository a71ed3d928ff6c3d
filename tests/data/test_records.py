"""TFDS builders write array_record files (no TensorFlow) whose examples equal the direct folder sources'."""

from __future__ import annotations

import glob
import json
import os
import pickle

import chex
import pytest

from contextblip_jax.data import captions, imagecode, pipeline, records


def test_imagecode_records_equal_the_folder_source(generated_root, tmp_path):
    data_dir = str(tmp_path / "tfds")
    built = records.build_imagecode(generated_root, data_dir)
    assert built == os.path.join(data_dir, "imagecode", "1.0.0")
    assert sorted(os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(built, "*.array_record*"))) == [
        "imagecode-test",
        "imagecode-train",
        "imagecode-valid",
    ]
    for split in imagecode.SPLIT_FILES:
        folder = imagecode.ImageCodeSource(generated_root, split)
        stored = records.ImageCodeRecords(data_dir, split)
        assert len(stored) == len(folder) > 0
        for i in range(len(folder)):
            assert stored[i] == folder[i]
    reopened = pickle.loads(pickle.dumps(stored))  # what grain does to reach worker processes
    assert reopened[len(folder) - 1] == folder[len(folder) - 1]

    settings = {"image_size": 16, "max_text_length": 16, "batch_size": 4, "augment": {"flip": "text_aware"}}
    from_folder = pipeline.DataConfig.from_config(None, root=generated_root, **settings)
    from_records = pipeline.DataConfig.from_config(None, source="tfds", tfds_dir=data_dir, **settings)
    for train, split in ((True, "train"), (False, "valid")):
        expected = list(zip(range(3), pipeline.imagecode_dataset(from_folder, split, train), strict=False))
        got = list(zip(range(3), pipeline.imagecode_dataset(from_records, split, train), strict=False))
        chex.assert_trees_all_equal(got, expected)


def test_reading_an_unbuilt_folder_or_split_says_so(generated_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="no built imagecode"):
        records.ImageCodeRecords(str(tmp_path), "train")
    root = str(tmp_path / "only_train")
    os.makedirs(os.path.join(root, "image-sets"))
    with open(imagecode.split_path(generated_root, "train")) as f:
        train = json.load(f)
    for name in train:
        os.symlink(imagecode.set_dir(generated_root, name), imagecode.set_dir(root, name))
    with open(imagecode.split_path(root, "train"), "w") as f:
        json.dump(train, f)
    records.build_imagecode(root, str(tmp_path / "tfds"))
    assert len(records.ImageCodeRecords(str(tmp_path / "tfds"), "train")) == sum(map(len, train.values()))
    with pytest.raises(ValueError, match="no split 'valid'"):
        records.ImageCodeRecords(str(tmp_path / "tfds"), "valid")


def test_caption_records_equal_the_folder_source(generated_root, tmp_path):
    images = sorted(glob.glob(os.path.join(generated_root, "image-sets", "*", "*.jpg")))[:5]
    relative = [os.path.relpath(p, generated_root) for p in images]
    coco = [{"image": relative[i % 3], "caption": f"caption {i}", "image_id": i} for i in range(6)]
    vg = [{"image": relative[3], "caption": ["a", "b"]}, {"image": relative[4], "caption": "c"}]
    files = []
    for name, content in (("coco.json", coco), ("vg.json", vg)):
        files.append(str(tmp_path / name))
        with open(files[-1], "w") as f:
            json.dump(content, f)
    folder = captions.CaptionSource(files, generated_root)
    assert [len(e.captions) for e in folder.examples] == [2, 2, 2, 2, 1]
    assert folder.examples[0].captions == ("caption 0", "caption 3")
    records.build_captions(files, generated_root, str(tmp_path / "tfds"))
    stored = records.CaptionRecords(str(tmp_path / "tfds"), "train")
    assert [stored[i] for i in range(len(stored))] == [folder[i] for i in range(len(folder))]
