"""BLIP caption files: one text or a list per entry, grouped per image; bad entries named; stage-1 batches, per
image or per caption (the authors': every caption once per epoch)."""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import ml_collections
import numpy as np
import pytest

from contextblip_jax import stages
from contextblip_jax.data import captions, pipeline
from contextblip_jax.data.errors import DataError
from contextblip_jax.data.preprocess import BlipTokenizer
from contextblip_jax.training import inputs
from tests.data.helpers import write_jpeg


@pytest.fixture
def caption_folder(tmp_path) -> tuple[str, str]:
    for name in ("a", "b", "c"):
        write_jpeg(str(tmp_path / "images" / f"{name}.jpg"), (200, 10, 10), size=20)
    entries = [
        {"image": "a.jpg", "caption": "a dog on the left"},
        {"image": "b.jpg", "caption": ["two cats", "cats sleeping"]},
        {"image": "a.jpg", "caption": "the dog again", "image_id": 3},
        {"image": "c.jpg", "caption": "a car"},
    ]
    path = str(tmp_path / "ann.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path, str(tmp_path / "images")


def test_groups_captions_per_image_in_first_appearance_order(caption_folder):
    path, image_root = caption_folder
    examples = captions.read_captions([path], image_root)
    assert [(e.image, e.captions) for e in examples] == [
        ("a.jpg", ("a dog on the left", "the dog again")),
        ("b.jpg", ("two cats", "cats sleeping")),
        ("c.jpg", ("a car",)),
    ]
    assert examples[0].image_path == os.path.join(image_root, "a.jpg")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"caption": "no image"}, "caption entry without an image"),
        ({"image": "  ", "caption": "blank image"}, "caption entry without an image"),
        ({"image": "a.jpg"}, "caption must be a non-empty text"),
        ({"image": "a.jpg", "caption": ["ok", ""]}, "caption must be a non-empty text"),
        ("just a string", "expected an object"),
        ({"image": "missing.jpg", "caption": "x"}, "image not found"),
        ({"image": "../a.jpg", "caption": "x"}, "not a path inside the image root"),
        ({"image": "sub/../../a.jpg", "caption": "x"}, "not a path inside the image root"),
        ({"image": "/etc/passwd", "caption": "x"}, "not a path inside the image root"),
    ],
)
def test_bad_entries_are_named_or_skipped(caption_folder, entry, message):
    path, image_root = caption_folder
    with open(path) as f:
        entries = json.load(f)
    with open(path, "w") as f:
        json.dump([*entries, entry], f)
    with pytest.raises(DataError, match=message) as raised:
        captions.read_captions([path], image_root)
    assert "entry 4" in str(raised.value) or "missing.jpg" in str(raised.value)
    assert len(captions.read_captions([path], image_root, on_error="skip")) == 3


def test_stage_one_batches(caption_folder):
    path, image_root = caption_folder
    cfg = pipeline.DataConfig.from_config(
        None,
        root=image_root,
        annotations=[path],
        image_size=8,
        max_text_length=12,
        batch_size=2,
        augment={"flip": "text_aware"},
    )
    iterator = iter(pipeline.captions_dataset(cfg, train=True))
    batches = [next(iterator) for _ in range(6)]
    chex.assert_shape(batches[0]["images"], (2, 8, 8, 3))
    chex.assert_shape([batches[0]["input_ids"], batches[0]["attention_mask"]], (2, 12))
    first_captions = {tuple(b["input_ids"][k]) for b in batches for k in range(2) if b["example_id"][k] == 1}
    assert len(first_captions) == 2  # image b's two captions are both drawn over four epochs
    evaluation = list(pipeline.captions_dataset(cfg, train=False))
    assert np.concatenate([b["example_id"] for b in evaluation]).tolist() == [0, 1, 2, -1]


def _caption_config(caption_folder, **overrides) -> pipeline.DataConfig:
    path, image_root = caption_folder
    settings = {"root": image_root, "annotations": (path,), "image_size": 8, "max_text_length": 12, "batch_size": 5}
    return pipeline.DataConfig(**{**settings, **overrides})


ALL_CAPTIONS = ("a dog on the left", "the dog again", "two cats", "cats sleeping", "a car")


def test_caption_sampling_passes_over_every_caption_once_per_epoch(caption_folder):
    config = _caption_config(caption_folder, caption_sampling="caption", num_epochs=3)
    source = pipeline.caption_source(config)
    assert len(source) == len(ALL_CAPTIONS)
    assert [source[i]["captions"] for i in range(len(source))] == [(c,) for c in ALL_CAPTIONS]
    ids, _ = BlipTokenizer()(ALL_CAPTIONS, 12)
    expected = sorted(map(tuple, ids.tolist()))
    epochs = list(pipeline.captions_dataset(config, train=True, source=source))  # batch_size 5: a batch per epoch
    assert len(epochs) == 3
    for batch in epochs:
        assert sorted(batch["example_id"].tolist()) == [0, 1, 2, 3, 4]
        assert sorted(map(tuple, batch["input_ids"].tolist())) == expected
    evaluation = next(iter(pipeline.captions_dataset(config, train=False, source=source)))
    assert evaluation["input_ids"].tolist() == ids.tolist()


def test_image_sampling_keeps_one_example_per_image(caption_folder):
    source = pipeline.caption_source(_caption_config(caption_folder))
    assert len(source) == 3
    assert source[0]["captions"] == ALL_CAPTIONS[:2]


def test_an_epoch_of_stage_one_is_the_caption_count_for_the_trainer(caption_folder):
    for sampling, examples in (("caption", 5), ("image", 3)):
        values = dataclasses.asdict(_caption_config(caption_folder, caption_sampling=sampling))
        config = ml_collections.ConfigDict({"data": {**values, "synthetic": 0, "synthetic_seed": 0}})
        assert inputs.train_input(config, stages.get("pretrain")).examples_per_epoch == examples


def test_caption_sampling_is_checked(caption_folder):
    with pytest.raises(ValueError, match="caption_sampling must be one of"):
        _caption_config(caption_folder, caption_sampling="pair")
    with pytest.raises(ValueError, match="records are per image"):
        pipeline.caption_source(_caption_config(caption_folder, caption_sampling="caption", source="tfds"))
