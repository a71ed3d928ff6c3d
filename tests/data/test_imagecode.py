"""The ImageCoDe reader: counts, the frame-number sort, video/static, the unlabelled test split, bad input."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from contextblip_jax.data import imagecode
from contextblip_jax.data.errors import DataError
from tests.data.helpers import colour_of, make_folder, write_jpeg, write_split

VIDEO_FRAMES = [5, 12, 100, 7, 31, 64, 250, 9, 18, 44]  # sorted: 5 7 9 12 18 31 44 64 100 250
STATIC = list(range(10))


def test_counts_match_what_was_generated(generated):
    root, counts = generated
    for split, expected in counts.items():
        examples = imagecode.read_split(root, split)
        assert len(examples) == expected["descriptions"]
        assert len({e.set_name for e in examples}) == expected["sets"]
        assert sum(e.is_video for e in examples) == expected["video_descriptions"]
        assert sum(not e.is_video for e in examples) == expected["static_descriptions"]


def test_target_is_the_kth_frame_in_numeric_order_not_img_k(tmp_path):
    root = make_folder(str(tmp_path), {"MSR-VTT-clip": VIDEO_FRAMES}, {"MSR-VTT-clip": {"1": "a", "3": "b", "8": "c"}})
    examples = imagecode.read_split(root, "train")
    names = [os.path.basename(p) for p in examples[0].image_paths]
    assert names == [f"img{f}.jpg" for f in sorted(VIDEO_FRAMES)]  # numeric, not img100 before img12
    expected_frames = {1: 7, 3: 12, 8: 100}
    for example in examples:
        frame = expected_frames[example.target]
        target_path = example.image_paths[example.target]
        assert os.path.basename(target_path) == f"img{frame}.jpg"
        with Image.open(target_path) as image:
            np.testing.assert_allclose(image.getpixel((8, 8)), colour_of(frame), atol=6)


def test_generated_video_sets_use_non_contiguous_frame_numbers(generated_root):
    examples = imagecode.read_split(generated_root, "train")
    video = [e for e in examples if e.is_video]
    assert video
    for example in video:
        frames = [imagecode.frame_number(os.path.basename(p)) for p in example.image_paths]
        assert frames == sorted(frames) and frames != list(range(10))
    assert any(os.path.basename(e.image_paths[e.target]) != f"img{e.target}.jpg" for e in video)


def test_static_iff_open_images_in_the_name(generated_root):
    examples = [e for split in ("train", "valid", "test") for e in imagecode.read_split(generated_root, split)]
    assert {e.is_video for e in examples} == {True, False}
    for e in examples:
        assert e.is_video == ("open-images" not in e.set_name)
        if not e.is_video:
            assert [os.path.basename(p) for p in e.image_paths] == [f"img{i}.jpg" for i in range(10)]


def test_test_split_has_no_targets_and_keeps_file_order(tmp_path):
    root = make_folder(
        str(tmp_path),
        {"YouCook-a": VIDEO_FRAMES, "open-images-1_ab": STATIC},
        {},
        test={"YouCook-a": ["x", "y"], "open-images-1_ab": ["z"]},
    )
    examples = imagecode.read_split(root, "test")
    assert [(e.set_name, e.description, e.description_index) for e in examples] == [
        ("YouCook-a", "x", 0),
        ("YouCook-a", "y", 1),
        ("open-images-1_ab", "z", 0),
    ]
    assert all(e.target == imagecode.NO_TARGET and not e.has_target for e in examples)
    assert [e.is_video for e in examples] == [True, True, False]


def _good(root: str) -> str:
    return make_folder(
        root,
        {"MSR-VTT-good": VIDEO_FRAMES, "open-images-2_bad": STATIC},
        {"MSR-VTT-good": {"2": "kept"}, "open-images-2_bad": {"4": "damaged"}},
    )


def _remove_image(root):
    os.remove(os.path.join(root, "image-sets", "open-images-2_bad", "img3.jpg"))


def _extra_image(root):
    write_jpeg(os.path.join(root, "image-sets", "open-images-2_bad", "img10.jpg"), (1, 2, 3))


def _missing_folder(root):
    shutil.rmtree(os.path.join(root, "image-sets", "open-images-2_bad"))


def _labels(value):
    def damage(root):
        write_split(root, "train_data.json", {"MSR-VTT-good": {"2": "kept"}, "open-images-2_bad": value})

    return damage


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_remove_image, "has 9 imgX.jpg images, expected 10"),
        (_extra_image, "has 11 imgX.jpg images"),
        (_missing_folder, "image set folder is missing"),
        (_labels({"12": "x"}), "target 12 is outside 0-9"),
        (_labels({"-1": "x"}), "target -1 is outside"),
        (_labels({"two": "x"}), "'two' is not an integer"),
        (_labels({"4": "   "}), "empty description"),
        (_labels({"4": 7}), "description is a int"),
        (_labels(["x"]), "expected a non-empty target"),
    ],
)
def test_bad_input_names_file_and_set_or_is_skipped_and_counted(tmp_path, caplog, damage, message):
    root = _good(str(tmp_path))
    damage(root)
    with pytest.raises(DataError, match=message) as raised:
        imagecode.read_split(root, "train")
    assert raised.value.set_name == "open-images-2_bad" and "open-images-2_bad" in str(raised.value)
    assert raised.value.path.startswith(root)
    with caplog.at_level(logging.WARNING):
        examples = imagecode.read_split(root, "train", on_error="skip")
    assert [e.description for e in examples] == ["kept"]
    assert "skipped 1 damaged example(s)" in caplog.text and message.split(" ")[0] in caplog.text


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/b", "..", ".", "sub\\dir", "nul\0byte"])
def test_a_set_name_that_leaves_the_image_folder_is_refused_before_any_file_is_opened(tmp_path, name, monkeypatch):
    root = _good(str(tmp_path))
    write_split(root, "train_data.json", {"MSR-VTT-good": {"2": "kept"}, name: {"4": "escape"}})
    opened = []
    monkeypatch.setattr(imagecode, "list_set_images", lambda r, n: opened.append(n) or [])
    with pytest.raises(DataError, match="not a plain folder name"):
        imagecode.read_split(root, "train")
    assert name not in opened
    assert not imagecode.is_plain_name(name) and imagecode.is_plain_name("open-images-2_bad")


@pytest.mark.parametrize("content", ["{not json", '["a", "b"]', "\xff\xfe"])
def test_malformed_file_is_an_error_naming_it_even_when_skipping(tmp_path, content):
    root = _good(str(tmp_path))
    with open(os.path.join(root, "train_data.json"), "wb") as f:
        f.write(content.encode("latin-1"))
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match=r"train_data\.json"):
            imagecode.read_split(root, "train", on_error=on_error)


def test_missing_split_file_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"valid_data\.json: file not found"):
        imagecode.read_split(str(tmp_path), "valid")
    with pytest.raises(ValueError, match="unknown ImageCoDe split"):
        imagecode.read_split(str(tmp_path), "dev")


def test_source_yields_the_jpeg_bytes_of_the_sorted_images(tmp_path):
    root = make_folder(str(tmp_path), {"MSR-VTT-clip": VIDEO_FRAMES}, {"MSR-VTT-clip": {"3": "a red thing"}})
    source = imagecode.ImageCodeSource(root, "train")
    record = source[0]
    assert len(source) == 1 and record["example_id"] == 0 and record["target"] == 3 and record["is_video"]
    assert record["image_names"][3] == "img12.jpg"
    with open(os.path.join(root, "image-sets", "MSR-VTT-clip", "img12.jpg"), "rb") as f:
        assert record["images"][3] == f.read()
