"""BLIP caption files: one text or a list per entry, grouped per image; bad entries named; stage-1 batches."""

from __future__ import annotations

import json
import os

import chex
import numpy as np
import pytest

from contextblip_jax.data import captions, pipeline
from contextblip_jax.data.errors import DataError
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
