"""Augmentation: text-aware and plain flips, one shared draw or one per image, reproducible from a seed; decoding.

BLIP's ops one by one (ops="blip") are in test_blip_randaugment.py."""

from __future__ import annotations

import dataclasses
import io

import chex
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from contextblip_jax.data import augment, preprocess, transforms
from contextblip_jax.data.augment import AugmentConfig
from contextblip_jax.data.errors import DataError

ALL_ON = AugmentConfig(random_resized_crop=True, randaugment_layers=3, randaugment_magnitude=6, flip="text_aware")
AUTHORS = AugmentConfig(random_resized_crop=True, randaugment_layers=2, ops="blip", flip="plain", per_image=True)


@pytest.mark.parametrize(
    ("text", "flipped"),
    [
        ("the dog on the left", "the dog on the right"),
        ("Left of the car, right of the tree", "Right of the car, left of the tree"),
        ("LEFT and RIGHT", "RIGHT and LEFT"),
        ("the leftmost cup and the rightmost one", "the rightmost cup and the leftmost one"),
        ("a right-hand glove, a lefthanded player", "a left-hand glove, a righthanded player"),
        ("moving leftwards on the right side", "moving rightwards on the left side"),
        ("bright copyright leftover lights", "bright copyright leftover lights"),
    ],
)
def test_flip_text_swaps_left_and_right_keeping_case(text, flipped):
    assert augment.flip_text(text) == flipped


@given(
    st.lists(
        st.sampled_from(["left", "Right", "LEFT", "rightmost", "the", "Bright", "leftover", ",", "-"]), max_size=12
    )
)
def test_flip_text_is_an_involution(words):
    text = " ".join(words)
    assert augment.flip_text(augment.flip_text(text)) == text


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def scene(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """An asymmetric image: a bright block in the left part, so flips and crops change it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
    pixels[5:20, 3:15] = (250, 30, 30)
    return Image.fromarray(pixels)


def element(images: list[bytes], description: str = "a red block on the left") -> dict:
    return {
        "example_id": 0,
        "set_name": "MSR-VTT-x",
        "description": description,
        "description_index": 0,
        "target": 2,
        "is_video": True,
        "image_names": tuple(f"img{i}.jpg" for i in range(len(images))),
        "images": tuple(images),
    }


def prepare(config: AugmentConfig, train: bool = True) -> transforms.PrepareImageCode:
    return transforms.PrepareImageCode(image_size=24, max_text_length=16, augment=config, train=train)


@pytest.mark.parametrize("config", [ALL_ON, AUTHORS])
def test_augmentation_is_reproducible_from_a_seed_and_varies_with_it(config):
    example = element([jpeg(scene(i)) for i in range(10)])
    run = prepare(config)
    first = run(example, np.random.default_rng(7))
    again = run(example, np.random.default_rng(7))
    chex.assert_trees_all_equal(first, again)
    others = [run(example, np.random.default_rng(seed))["images"] for seed in range(8, 14)]
    assert all(not np.array_equal(first["images"], other) for other in others)


@pytest.mark.parametrize("config", [ALL_ON, dataclasses.replace(AUTHORS, per_image=False)])
def test_one_draw_is_applied_to_all_ten_images(config):
    example = element([jpeg(scene(0))] * 10)
    plain = prepare(AugmentConfig(), train=False)(example)["images"]
    for seed in range(5):
        out = prepare(config)(example, np.random.default_rng(seed))["images"]
        chex.assert_shape(out, (10, 24, 24, 3))
        for k in range(1, 10):
            chex.assert_trees_all_equal(out[k], out[0])
        assert not np.array_equal(out[0], plain[0])


def test_text_aware_flip_mirrors_the_images_and_swaps_the_description():
    example = element([jpeg(scene(i)) for i in range(10)])
    always = AugmentConfig(flip="text_aware", flip_probability=1.0)
    flipped = prepare(always)(example, np.random.default_rng(0))
    plain = prepare(AugmentConfig(), train=False)(example)
    chex.assert_trees_all_equal(flipped["images"], plain["images"][:, :, ::-1])
    ids, _ = preprocess.BlipTokenizer()(["a red block on the right"], 16)
    chex.assert_trees_all_equal(flipped["input_ids"], ids[0])
    off = prepare(AugmentConfig(flip="off", random_resized_crop=True))(example, np.random.default_rng(0))
    chex.assert_trees_all_equal(off["input_ids"], plain["input_ids"])


def test_per_image_draws_crop_ops_and_flip_for_each_image():
    """The authors' transform runs once per candidate: 10 copies of one image come out 10 different ways."""
    draws = augment.sample_all(np.random.default_rng(1), AUTHORS, [(48, 40)] * 10)  # seed 0 flips none of 10
    assert len({draw.pixel_crop for draw in draws}) == 10
    assert len({draw.ops for draw in draws}) > 1 and len({draw.flip for draw in draws}) == 2
    out = prepare(AUTHORS)(element([jpeg(scene(0))] * 10), np.random.default_rng(1))["images"]
    assert len({image.tobytes() for image in out}) == 10


@pytest.mark.parametrize("per_image", [False, True])
def test_plain_flip_mirrors_the_images_and_keeps_the_description(per_image):
    example = element([jpeg(scene(i)) for i in range(10)])
    always = AugmentConfig(flip="plain", flip_probability=1.0, ops="blip", per_image=per_image)
    flipped = prepare(always)(example, np.random.default_rng(0))
    plain = prepare(AugmentConfig(), train=False)(example)
    chex.assert_trees_all_equal(flipped["images"], plain["images"][:, :, ::-1])
    chex.assert_trees_all_equal(flipped["input_ids"], plain["input_ids"])


def test_a_per_image_crop_is_torchvisions_whole_pixel_box_cut_out_then_resized():
    """torchvision's RandomResizedCrop: sides rounded to whole pixels within scale and ratio, the corner a whole
    position, and the box cut out before the bicubic resize (pixels outside it never reach the result)."""
    config = AugmentConfig(random_resized_crop=True, crop_scale=(0.2, 1.0), per_image=True)
    rng = np.random.default_rng(0)
    for _ in range(200):
        (draw,) = augment.sample_all(rng, config, [(300, 200)])
        left, top, right, bottom = draw.pixel_crop
        assert all(isinstance(v, int) for v in draw.pixel_crop)
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        w, h = right - left, bottom - top
        assert 0.2 * 60_000 - 2 * max(w, h) <= w * h <= 60_000 and 3 / 4 - 0.02 < w / h < 4 / 3 + 0.02
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), np.uint8))
    draw = augment.Augmentation(pixel_crop=(40, 30, 140, 110))
    expected = image.crop((40, 30, 140, 110)).resize((64, 64), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(augment.apply(image, draw, 64)), np.asarray(expected))
    outside = np.asarray(image).copy()
    outside[:30] = 0  # rows above the box
    same = augment.apply(Image.fromarray(outside), draw, 64)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(expected))


def test_random_resized_crop_boxes_follow_scale_and_ratio():
    config = AugmentConfig(random_resized_crop=True, crop_scale=(0.3, 0.8), crop_ratio=(0.75, 1.25))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = augment.sample(rng, config, 300, 200).crop
        assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
        area = (right - left) * (bottom - top)
        ratio = (right - left) * 300 / ((bottom - top) * 200)
        assert 0.3 - 1e-9 <= area <= 0.8 + 1e-9 and 0.75 - 1e-9 <= ratio <= 1.25 + 1e-9


def test_config_errors_name_the_field():
    for bad, field in [
        ({"flip": "mirror"}, "flip"),
        ({"ops": "torchvision"}, "ops"),
        ({"per_image": True, "flip": "text_aware"}, "per_image"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"randaugment_magnitude": 11}, "randaugment"),
        ({"flip_probability": 2}, "flip_probability"),
    ]:
        with pytest.raises(ValueError, match=field):
            AugmentConfig(**bad)


def test_decode_rejects_truncated_and_non_jpeg_files_naming_them():
    data = jpeg(scene(1, (64, 64)))
    with pytest.raises(DataError, match="cannot decode JPEG") as raised:
        preprocess.decode_jpeg(data[: len(data) // 2], "image-sets/s/img3.jpg", "s")
    assert str(raised.value).startswith("image-sets/s/img3.jpg [set s]")
    png = io.BytesIO()
    scene(1).save(png, "PNG")
    with pytest.raises(DataError, match="not a JPEG"):
        preprocess.decode_jpeg(png.getvalue(), "img0.jpg", "s")
    assert preprocess.decode_jpeg(data, "img0.jpg").size == (64, 64)
    assert preprocess.decode_jpeg(jpeg(scene(1, (400, 400))), "big.jpg", draft_size=64).size == (100, 100)
