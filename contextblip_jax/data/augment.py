"""Training augmentation: random resized crop, a light RandAugment-style set and a text-aware horizontal flip.

One draw per example is applied to all its images (the 10 candidates of an ImageCoDe description) and to its
text. Independent draws would make candidates differ by augmentation, which is exactly the kind of small
difference the task asks the model to read, and a flip of some candidates only would contradict the text.

The flip is text-aware or off: the authors flipped images without touching "left"/"right" in the descriptions,
which teaches the wrong side half of the time. Here a flip also swaps left and right words, keeping their case.
Known limit: "right" meaning "correct" and "left" meaning "departed" are swapped too; both are rare in IRCD text.

Colour-changing RandAugment ops (solarize, posterize, colour balance) are left out: descriptions name colours.
All randomness comes from the `np.random.Generator` the pipeline passes in, so a seed reproduces every draw.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FLIP_MODES = ("off", "text_aware")
FILL = (124, 117, 104)  # the CLIP mean in 0-255: pixels uncovered by rotation or translation normalise to ≈0
OPS = (
    "identity",
    "autocontrast",
    "equalize",
    "brightness",
    "contrast",
    "sharpness",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_OP_PROBABILITY = 0.5  # each chosen op is applied with this probability, as in BLIP's RandomAugment
_LEFT_RIGHT = re.compile(r"\b(left|right)(most|wards?|hand|handed|side|sided)?\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """`config.data.augment`: everything off by default (evaluation and the zero-shot stage need none).

    random_resized_crop: crop a box of `crop_scale` of the area with aspect ratio within `crop_ratio`, resize back.
    randaugment_layers / randaugment_magnitude: ops drawn per example and their strength (0-10).
    flip: "off" or "text_aware" (a flip also swaps left/right words), with probability `flip_probability`.
    BLIP's stage-1 recipe is `random_resized_crop=True, crop_scale=(0.2, 1.0), randaugment_layers=2,
    randaugment_magnitude=5` with a horizontal flip.
    """

    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment_layers: int = 0
    randaugment_magnitude: float = 5.0
    flip: str = "off"
    flip_probability: float = 0.5

    def __post_init__(self):
        if self.flip not in FLIP_MODES:
            raise ValueError(f"augment.flip must be one of {FLIP_MODES}, got {self.flip!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augment.crop_ratio must be positive and increasing, got {self.crop_ratio}")
        if self.randaugment_layers < 0 or not 0 <= self.randaugment_magnitude <= 10:
            raise ValueError("augment.randaugment_layers must be >= 0 and randaugment_magnitude within 0-10")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"augment.flip_probability must be within 0-1, got {self.flip_probability}")

    @property
    def enabled(self) -> bool:
        return self.random_resized_crop or self.randaugment_layers > 0 or self.flip != "off"


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One draw: a crop box as fractions of the image (left, top, right, bottom), RandAugment ops, a flip."""

    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    ops: tuple[tuple[str, float], ...] = ()
    flip: bool = False


def _sample_crop(rng: np.random.Generator, config: AugmentConfig, width: int, height: int) -> tuple[float, ...]:
    """torchvision's RandomResizedCrop box, as fractions so that it fits every image of a set."""
    log_low, log_high = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    for _ in range(10):
        area = rng.uniform(*config.crop_scale) * width * height
        ratio = math.exp(rng.uniform(log_low, log_high))
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (left / width, top / height, (left + w) / width, (top + h) / height)
    ratio = min(max(width / height, config.crop_ratio[0]), config.crop_ratio[1])  # fallback: central crop
    w, h = (width, width / ratio) if width / height < ratio else (height * ratio, height)
    return ((1 - w / width) / 2, (1 - h / height) / 2, (1 + w / width) / 2, (1 + h / height) / 2)


def sample(rng: np.random.Generator, config: AugmentConfig, width: int, height: int) -> Augmentation:
    """Draws the augmentation of one example from `rng`; (width, height) is its first image's size."""
    crop = _sample_crop(rng, config, width, height) if config.random_resized_crop else Augmentation.crop
    ops = []
    for _ in range(config.randaugment_layers):
        name = OPS[rng.integers(len(OPS))]
        applied = rng.random() < _OP_PROBABILITY
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if applied and name != "identity":
            ops.append((name, sign * config.randaugment_magnitude / 10))
    flip = config.flip == "text_aware" and rng.random() < config.flip_probability
    return Augmentation(crop=tuple(crop), ops=tuple(ops), flip=flip)


def _apply_op(image: Image.Image, name: str, level: float) -> Image.Image:
    """`level` in [-1, 1]: the signed magnitude / 10."""
    w, h = image.size
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name in ("brightness", "contrast", "sharpness"):
        enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast}.get(
            name, ImageEnhance.Sharpness
        )
        return enhancer(image).enhance(1.0 + 0.5 * level)
    if name == "rotate":
        return image.rotate(30 * level, resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    affine = {
        "shear_x": (1, 0.3 * level, -0.3 * level * h / 2, 0, 1, 0),
        "shear_y": (1, 0, 0, 0.3 * level, 1, -0.3 * level * w / 2),
        "translate_x": (1, 0, 0.2 * level * w, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, 0.2 * level * h),
    }[name]
    return image.transform(image.size, Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR, fillcolor=FILL)


def apply(image: Image.Image, augmentation: Augmentation, size: int) -> Image.Image:
    """Crop + bicubic resize to size×size in one resampling, then the ops, then the flip."""
    w, h = image.size
    left, top, right, bottom = augmentation.crop
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=(left * w, top * h, right * w, bottom * h))
    for name, level in augmentation.ops:
        out = _apply_op(out, name, level)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if augmentation.flip else out


def _swap(match: re.Match) -> str:
    word = match.group(1)
    other = "right" if word.lower() == "left" else "left"
    if word.isupper():
        other = other.upper()
    elif word[0].isupper():
        other = other.capitalize()
    return other + (match.group(2) or "")


def flip_text(text: str) -> str:
    """The description of the mirrored image: left ↔ right (also leftmost, right-hand, ...), case kept."""
    return _LEFT_RIGHT.sub(_swap, text)
