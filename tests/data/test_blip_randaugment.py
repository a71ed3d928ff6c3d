"""ops="blip" against BLIP's transform/randaugment.py, each expected value rebuilt here from BLIP's formulas.

The references are written independently of `augment.py`: BLIP's numpy as it reads (autocontrast, equalize,
brightness, sharpness), hand-computed shifts, and cv2.warpAffine's sampling in floating point with its
rounding of source points (to 1/32 pixel; exact bilinear sampling would differ by up to 2 near the fill).
Against BLIP's own functions, run under cv2 4.9.0 and numpy 1.25.2 (the authors' requirements), `_blip_op` was
bit-identical for every op at magnitudes 3, 5, 7 and 10, both signs, on 40 images of 224×224 and 224×180
(measured once outside the test suite: cv2 is not a dependency).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from contextblip_jax.data import augment
from contextblip_jax.data.augment import AugmentConfig

BLIP_AUGS = ["Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize"]
BLIP_AUGS += ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]  # the authors' `augs`, in their order


def photo() -> np.ndarray:
    """A fixed smooth asymmetric image, 20 high and 24 wide, every channel above 0."""
    y, x = np.mgrid[0:20, 0:24]
    red = 10 + 5 * x + 4 * y
    green = 120 + 60 * np.sin(x / 3) * np.cos(y / 4)
    blue = 200 - 6 * y + 2 * x
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 14, 3), dtype=np.uint8)


def cv2_bilinear(image: np.ndarray, to_source: np.ndarray) -> np.ndarray:
    """cv2.warpAffine's INTER_LINEAR sampling, in floating point: each output pixel (x, y) reads the source at
    to_source @ (x, y, 1), a·x and b·y + c rounded to 1/1024 pixel and their sum to 1/32 (cv2's AB_BITS and
    INTER_BITS); bilinear between the 4 neighbours, 128 for those outside the image, rounded half up."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)

    def source(row: np.ndarray) -> np.ndarray:
        return np.floor((np.rint(row[0] * x * 1024) + np.rint((row[1] * y + row[2]) * 1024) + 16) / 32) / 32

    sx, sy = source(to_source[0]), source(to_source[1])
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def at(xi: np.ndarray, yi: np.ndarray) -> np.ndarray:
        inside = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h))[..., None]
        return np.where(inside, image[yi.clip(0, h - 1), xi.clip(0, w - 1)], 128.0)

    top = (1 - fx) * at(x0, y0) + fx * at(x0 + 1, y0)
    bottom = (1 - fx) * at(x0, y0 + 1) + fx * at(x0 + 1, y0 + 1)
    return np.floor((1 - fy) * top + fy * bottom + 0.5)


def test_blip_op_list_probability_and_magnitude():
    """BLIP's list (Identity drawn but a no-op), each of N=2 ops kept with probability 0.5, ±m/10 levels."""
    snake = {re.sub(r"(?<=[a-z])([XY])$", r"_\1", name).lower() for name in BLIP_AUGS}
    assert set(augment.BLIP_OPS) == snake
    config = AugmentConfig(randaugment_layers=2, randaugment_magnitude=5, ops="blip")
    rng = np.random.default_rng(0)
    draws = [augment.sample(rng, config, 32, 32).ops for _ in range(4000)]
    names = [name for ops in draws for name, _ in ops]
    assert set(names) == snake - {"identity"}
    assert abs(len(names) / 8000 - 0.5 * 9 / 10) < 0.02
    assert {level for ops in draws for _, level in ops} == {0.5, -0.5}


def test_autocontrast_as_blip_runs_it():
    """BLIP's `offset = -low * scale` negates a uint8 `low`: it wraps, whitening channels whose minimum is > 0."""
    image = noise()
    image[..., 0] = image[..., 0].astype(int) * 200 // 255
    image[0, 0, 0] = 0
    image[..., 1] = image[..., 1].clip(30, 200)
    image[..., 2] = 77
    expected = []
    for channel in np.moveaxis(image, -1, 0):
        high, low = channel.max(), channel.min()  # uint8 scalars, as cv2.split gives them
        table = np.arange(256, dtype=np.float64)
        if high > low:
            scale = 255 / (high - low)
            with np.errstate(over="ignore"):
                offset = -low * scale
            table = np.arange(256) * scale + offset
        expected.append(table.clip(0, 255).astype(np.uint8)[channel])
    out = augment._blip_op(image, "autocontrast", 0.5)
    np.testing.assert_array_equal(out, np.stack(expected, axis=-1))
    np.testing.assert_array_equal(out[..., 0], (image[..., 0].astype(int) * 255 // image[..., 0].max()))
    assert (out[..., 1] == 255).all() and (out[..., 2] == 77).all()


@pytest.mark.parametrize("image", [noise(1), photo(), np.full((6, 5, 3), 9, np.uint8)])
def test_equalize_follows_blips_histogram_formula(image):
    expected = []
    for channel in np.moveaxis(image, -1, 0):
        histogram = np.bincount(channel.ravel(), minlength=256)
        step = histogram[histogram != 0][:-1].sum() // 255
        if step == 0:
            expected.append(channel)
            continue
        counts = np.concatenate([[step // 2], histogram[:-1]])
        expected.append((np.cumsum(counts) // step).clip(0, 255).astype(np.uint8)[channel])
    np.testing.assert_array_equal(augment._blip_op(image, "equalize", -0.5), np.stack(expected, axis=-1))


@pytest.mark.parametrize("name", ["brightness", "sharpness"])
def test_brightness_and_sharpness_change_nothing_at_magnitude_5(name):
    image = noise(2)
    np.testing.assert_array_equal(augment._blip_op(image, name, 0.5), image)
    np.testing.assert_array_equal(augment._blip_op(image, name, -0.5), image)


def test_brightness_scales_by_level_times_1_8_plus_0_1():
    image = noise(3)
    factor = np.float32(0.8 * 1.8 + 0.1)
    expected = np.minimum(np.floor(image.astype(np.float32) * factor), 255)
    np.testing.assert_array_equal(augment._blip_op(image, "brightness", -0.8), expected)


@pytest.mark.parametrize("magnitude", [3, 10])
def test_sharpness_blends_with_blips_3x3_blur(magnitude):
    """Blur [[1,1,1],[1,5,1],[1,1,1]]/13 with mirrored edges (cv2's default), rounded; frame kept; the cast
    wraps out-of-range values (factor 1.9 at magnitude 10)."""
    image = noise(4)
    h, w = image.shape[:2]
    factor = np.float32(magnitude / 10 * 1.8 + 0.1)

    def mirror(i: int, n: int) -> int:
        return -i if i < 0 else 2 * (n - 1) - i if i >= n else i

    blurred = np.empty(image.shape, np.float32)
    for y in range(h):
        for x in range(w):
            total = sum(
                (5 if dy == dx == 0 else 1) * image[mirror(y + dy, h), mirror(x + dx, w)].astype(np.float32) / 13
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            )
            blurred[y, x] = np.rint(total)
    expected = image.astype(np.float32)
    inner = blurred[1:-1, 1:-1]
    expected[1:-1, 1:-1] = inner + factor * (expected[1:-1, 1:-1] - inner)
    expected = np.mod(np.trunc(expected), 256)
    if magnitude == 10:
        assert (np.trunc(inner + factor * (image[1:-1, 1:-1] - inner)) < 0).any()  # the wrap is exercised
    np.testing.assert_array_equal(augment._blip_op(image, "sharpness", magnitude / 10), expected)


@pytest.mark.parametrize("sign", [1, -1])
def test_translate_moves_by_magnitude_pixels_with_fill_128(sign):
    """Magnitude 5 → 5 pixels (BLIP's translate_const 10 × 5/10); positive: content moves left / up."""
    image = photo()
    out_x = augment._blip_op(image, "translate_x", 0.5 * sign)
    out_y = augment._blip_op(image, "translate_y", 0.5 * sign)
    if sign > 0:
        np.testing.assert_array_equal(out_x[:, :-5], image[:, 5:])
        np.testing.assert_array_equal(out_y[:-5], image[5:])
        assert (out_x[:, -5:] == 128).all() and (out_y[-5:] == 128).all()
    else:
        np.testing.assert_array_equal(out_x[:, 5:], image[:, :-5])
        np.testing.assert_array_equal(out_y[5:], image[:-5])
        assert (out_x[:, :5] == 128).all() and (out_y[:5] == 128).all()


@pytest.mark.parametrize("level", [0.5, -0.5, 1.0])
def test_shear_maps_x_plus_factor_y_like_cv2(level):
    """BLIP's M = [[1, f, 0], [0, 1, 0]] (ShearX) sends (x, y) to (x + f·y, y); f = 0.3·m/10."""
    image, shear = photo(), np.float64(np.float32(0.3 * level))
    np.testing.assert_array_equal(
        augment._blip_op(image, "shear_x", level), cv2_bilinear(image, np.array([[1, -shear, 0], [0, 1, 0]]))
    )
    np.testing.assert_array_equal(
        augment._blip_op(image, "shear_y", level), cv2_bilinear(image, np.array([[1, 0, 0], [-shear, 1, 0]]))
    )


@pytest.mark.parametrize("level", [0.5, -0.5])
def test_rotate_about_w2_h2_by_30_degrees_times_level(level):
    """cv2.getRotationMatrix2D((w/2, h/2), 15, 1): anticlockwise on screen for positive angles."""
    image = photo()
    h, w = image.shape[:2]
    angle = math.radians(30 * level)
    alpha, beta = math.cos(angle), math.sin(angle)
    forward = np.array(
        [
            [alpha, beta, (1 - alpha) * w / 2 - beta * h / 2],
            [-beta, alpha, beta * w / 2 + (1 - alpha) * h / 2],
            [0, 0, 1],
        ]
    )
    np.testing.assert_array_equal(augment._blip_op(image, "rotate", level), cv2_bilinear(image, np.linalg.inv(forward)))


def test_blip_set_flips_before_its_ops():
    """torchvision's order in the authors' transform: RandomHorizontalFlip, then RandomAugment."""
    image = Image.fromarray(photo())
    draw = augment.Augmentation(ops=(("translate_x", 0.5),), flip=True, op_set="blip")
    out = np.asarray(augment.apply(image, draw, 24))
    resized = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[:, :-5], resized[:, ::-1][:, 5:])
    assert (out[:, -5:] == 128).all()
