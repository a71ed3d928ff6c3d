"""Where the described shapes are: the boxes replayed from a generated folder's records lie on the drawn shapes."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from contextblip_jax.data import imagecode, scenes, synthetic

KINDS = "attributes:1,motion:1,relation:1,timeline:1"


def test_described_names_the_queried_shapes():
    red, blue = scenes.Thing("red", "square", 0, 0.5), scenes.Thing("blue", "circle", 2, 0.5)
    pair = scenes.scene([red, blue])
    assert scenes.described(("group", "red", "square", 0, 1), (red,)) == [red]
    assert set(scenes.described(("relation", ("red", "square"), "left of", ("blue", "circle")), pair)) == {red, blue}
    assert scenes.described(("appears", "blue", "circle", 1), pair) == [blue]
    assert scenes.described(("disappears", "green", "circle", 0), pair) == []


def test_boxes_lie_on_the_drawn_shapes_and_off_them_is_background(tmp_path):
    root = str(tmp_path)
    synthetic.ensure(root, seed=5, num_train_sets=6, num_valid_sets=6, num_test_sets=2, image_size=64, kinds=KINDS)
    found_boxes = synthetic.scene_boxes(root)
    assert found_boxes is not None
    boxes = found_boxes.described
    records = {s.name: s for s in synthetic.sample_sets(5, 6, 6, 2, KINDS)}
    assert len(boxes) == sum(len(s.queries) for s in records.values())
    for name, image_set in records.items():
        assert [len(f) for f in found_boxes.frames[name]] == [len(things) for things in image_set.scenes]
    checked = 0
    for (name, target), found in boxes.items():
        image_set = records[name]
        wanted = set(scenes.described(image_set.queries[target], image_set.scenes[target]))
        named = [t for t in image_set.scenes[target] if t in wanted]  # the boxes come in scene order
        assert len(found) == len(named)
        path = os.path.join(imagecode.set_dir(root, name), f"img{image_set.frames[target]}.jpg")
        pixels = np.asarray(Image.open(path).convert("RGB"), np.float64)
        background = pixels[1, 1]
        for (left, top, right, bottom), thing in zip(found, named, strict=True):
            row, column = int((top + bottom) / 2 * 64), int((left + right) / 2 * 64)
            assert np.abs(pixels[row, column] - background).max() > 60, (name, target)
            if thing.shape != "triangle":  # the box is tight: 2 px inside is shape, 2 px outside is background
                for x, on in (
                    (left * 64 + 2, True),
                    (right * 64 - 2, True),
                    (left * 64 - 2, False),
                    (right * 64 + 2, False),
                ):
                    assert (np.abs(pixels[row, int(x)] - background).max() > 60) == on, (name, target, thing)
            checked += 1
    assert checked > 20


def test_set_kinds_name_every_set_of_the_folder_with_a_kind_of_its_mix(tmp_path):
    root = str(tmp_path)
    synthetic.ensure(root, seed=3, num_train_sets=12, num_valid_sets=4, num_test_sets=4, kinds="detail:1,recolour:1")
    kinds = synthetic.set_kinds(root)
    assert kinds is not None
    written = set()
    for split in synthetic.SPLITS:
        with open(imagecode.split_path(root, split)) as f:
            written |= set(json.load(f))
    assert set(kinds) == written
    assert set(kinds.values()) == {"detail", "recolour"}
    for name, kind in kinds.items():  # recolour is a video kind: its sets carry a video source's name
        assert name.startswith(synthetic.VIDEO_PREFIXES) == (kind == "recolour"), name


def test_a_folder_without_a_manifest_has_no_records(tmp_path):
    synthetic.generate(str(tmp_path), num_train_sets=2, num_valid_sets=1, num_test_sets=1)
    assert synthetic.scene_boxes(str(tmp_path)) is None
    assert synthetic.set_kinds(str(tmp_path)) is None
    with open(tmp_path / synthetic.MANIFEST, "w") as f:
        json.dump({"generator": synthetic.__name__, "version": synthetic.VERSION - 1}, f)
    assert synthetic.scene_boxes(str(tmp_path)) is None
    assert synthetic.set_kinds(str(tmp_path)) is None
