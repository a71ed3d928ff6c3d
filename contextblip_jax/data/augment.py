"""Training augmentation: random resized crop, RandAugment-style ops and a horizontal flip.

The project's choice (`per_image=False`, `ops="project"`, `flip="text_aware"`; the fields' defaults switch all
augmentation off): one draw per example is applied to all its images (the 10 candidates of an ImageCoDe
description) and to its text. Independent draws would make candidates differ by augmentation, which is exactly
the kind of small difference the task asks the model to read, and a flip of some candidates only would
contradict the text. A flip also swaps left and right words, keeping their case: flipping the images alone
teaches the wrong side half of the time. Known limit: "right" meaning "correct" and "left" meaning "departed"
are swapped too; both are rare in IRCD text. Colour-changing ops (solarize, posterize, colour balance) are left
out: descriptions name colours.

The authors' recipe (`per_image=True`, `ops="blip"`, `flip="plain"`) reproduces their torchvision
`transform_train`, run independently on each of the 10 images: RandomResizedCrop, RandomHorizontalFlip (text
untouched), then BLIP's `RandomAugment(2, 5)` over its 10 ops with BLIP's formulas as they run, cv2 included
(`_blip_op`; at magnitude 5 its Brightness and Sharpness change nothing, and its AutoContrast whitens every
channel whose minimum is above 0, see `_blip_autocontrast`).

All randomness comes from the `np.random.Generator` the pipeline passes in, so a seed reproduces every draw.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FLIP_MODES = ("off", "text_aware", "plain")
OP_SETS = ("project", "blip")
FILL = (124, 117, 104)  # the CLIP mean in 0-255: pixels uncovered by rotation or translation normalise to ≈0
BLIP_FILL = 128  # BLIP's replace_value (128, 128, 128)
BLIP_OPS = (
    "identity",
    "autocontrast",
    "brightness",
    "sharpness",
    "equalize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
)
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
    randaugment_layers / randaugment_magnitude: ops drawn per draw, each applied with probability 0.5, and
        their strength (0-10).
    ops: "project" (identity, autocontrast, equalize, brightness, contrast, sharpness, rotate ±30°·m/10,
        shear ±0.3·m/10, translate ±20%·m/10, CLIP-mean fill) or "blip" (BLIP's RandomAugment list and
        formulas: identity, autocontrast, brightness, sharpness, equalize, shear_x/y ±0.3·m/10, translate_x/y
        ±m pixels, rotate ±30°·m/10, fill 128; the flip comes before the ops, as in the authors' transform).
    flip: "off", "text_aware" (a flip also swaps left/right words) or "plain" (images only, the authors'),
        with probability `flip_probability`.
    per_image: False draws once per example for all its images; True draws crop, ops and flip for each image
        independently (the authors'); not with flip="text_aware", whose text cannot follow several flips.
    The authors' ImageCoDe recipe (BLIP's too) is `random_resized_crop=True, crop_scale=(0.2, 1.0),
    randaugment_layers=2, randaugment_magnitude=5, ops="blip", flip="plain", per_image=True`.
    """

    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment_layers: int = 0
    randaugment_magnitude: float = 5.0
    flip: str = "off"
    flip_probability: float = 0.5
    per_image: bool = False
    ops: str = "project"

    def __post_init__(self):
        if self.flip not in FLIP_MODES:
            raise ValueError(f"augment.flip must be one of {FLIP_MODES}, got {self.flip!r}")
        if self.ops not in OP_SETS:
            raise ValueError(f"augment.ops must be one of {OP_SETS}, got {self.ops!r}")
        if self.per_image and self.flip == "text_aware":
            raise ValueError('augment.per_image flips images one by one: use flip="plain" or "off", not "text_aware"')
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
    """One draw: a crop box as fractions of the image (left, top, right, bottom), or, for a draw made for one
    image (`per_image`), in whole pixels as torchvision crops; ops with their signed magnitude / 10, a flip, and
    which op set (`AugmentConfig.ops`) defines the ops."""

    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    pixel_crop: tuple[int, int, int, int] | None = None
    ops: tuple[tuple[str, float], ...] = ()
    flip: bool = False
    op_set: str = "project"


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


def _sample_pixel_crop(
    rng: np.random.Generator, config: AugmentConfig, width: int, height: int
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` for one image: a box of whole pixels (left, top, right,
    bottom), the sides rounded and the corner drawn among whole positions, as the authors crop each image."""
    log_low, log_high = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    for _ in range(10):
        area = rng.uniform(*config.crop_scale) * width * height
        ratio = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    if width / height < config.crop_ratio[0]:  # fallback: central crop at the nearest allowed ratio
        w, h = width, round(width / config.crop_ratio[0])
    elif width / height > config.crop_ratio[1]:
        w, h = round(height * config.crop_ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def sample(
    rng: np.random.Generator, config: AugmentConfig, width: int, height: int, whole_pixels: bool = False
) -> Augmentation:
    """Draws one augmentation from `rng` for an image of (width, height) (the first one when shared);
    `whole_pixels`: the crop is for this image alone, in whole pixels (`_sample_pixel_crop`)."""
    crop, pixel_crop = Augmentation.crop, None
    if config.random_resized_crop and whole_pixels:
        pixel_crop = _sample_pixel_crop(rng, config, width, height)
    elif config.random_resized_crop:
        crop = _sample_crop(rng, config, width, height)
    names = BLIP_OPS if config.ops == "blip" else OPS
    ops = []
    for _ in range(config.randaugment_layers):
        name = names[rng.integers(len(names))]
        applied = rng.random() < _OP_PROBABILITY
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if applied and name != "identity":
            ops.append((name, sign * config.randaugment_magnitude / 10))
    flip = config.flip != "off" and rng.random() < config.flip_probability
    return Augmentation(crop=tuple(crop), pixel_crop=pixel_crop, ops=tuple(ops), flip=flip, op_set=config.ops)


def sample_all(rng: np.random.Generator, config: AugmentConfig, sizes: list[tuple[int, int]]) -> list[Augmentation]:
    """The draws for an example's images of (width, height) `sizes`: one each if `per_image`, else one shared."""
    if config.per_image:
        return [sample(rng, config, *size, whole_pixels=True) for size in sizes]
    return [sample(rng, config, *sizes[0])] * len(sizes)


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


def _blip_autocontrast(channel: np.ndarray) -> np.ndarray:
    """BLIP's AutoContrast as it runs: its offset `-low * scale` negates a uint8 `low`, which wraps to 256 - low,
    so only a channel whose minimum is 0 is stretched (×255/max, truncated); any other non-constant channel
    becomes 255 everywhere."""
    low, high = int(channel.min()), int(channel.max())
    if high <= low:
        return channel
    if low > 0:
        return np.full_like(channel, 255)
    return (np.arange(256) * (255 / high)).clip(0, 255).astype(np.uint8)[channel]


def _blip_sharpness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """BLIP's Sharpness: extrapolate from cv2.filter2D's [[1,1,1],[1,5,1],[1,1,1]]/13 blur (mirrored edges,
    rounded to uint8) in float32, truncated; the 1-pixel frame keeps the original pixels. BLIP casts to uint8
    without clipping: values outside 0-255 (magnitudes above 5) wrap modulo 256, as numpy's cast does on x86."""
    if factor == 1.0:
        return pixels
    h, w = pixels.shape[:2]
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    padded = np.pad(pixels.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    blurred = np.rint(sum(kernel[i, j] * padded[i : i + h, j : j + w] for i in range(3) for j in range(3)))
    out = pixels.astype(np.float32)
    inner = blurred[1:-1, 1:-1]
    out[1:-1, 1:-1] = inner + np.float32(factor) * (out[1:-1, 1:-1] - inner)
    return out.astype(np.int64).astype(np.uint8)


def _warp(pixels: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(pixels, forward, (w, h), INTER_LINEAR, fill 128) in cv2's own fixed-point arithmetic, so
    that BLIP's geometric ops need no cv2: the inverse map's source points rounded to 1/32 pixel, bilinear
    weights in 1/1024, neighbours outside the image take the fill value, the sum rounded half up."""
    (a, b, c), (d, e, f) = forward.astype(np.float64)
    inverse_det = 1.0 / (a * e - b * d)
    a, b, d, e = e * inverse_det, -b * inverse_det, -d * inverse_det, a * inverse_det
    c, f = -a * c - b * f, -d * c - e * f
    h, w = pixels.shape[:2]
    xs, ys = np.arange(w), np.arange(h)
    sx = (np.rint(a * xs * 1024)[None, :] + np.rint((b * ys + c) * 1024)[:, None] + 16).astype(np.int64) >> 5
    sy = (np.rint(d * xs * 1024)[None, :] + np.rint((e * ys + f) * 1024)[:, None] + 16).astype(np.int64) >> 5
    fx, fy = (sx & 31).astype(np.int32), (sy & 31).astype(np.int32)
    # channel planes in a 2-pixel frame of fill: clipping the top-left neighbour to the frame puts all four
    # neighbours of a point outside the image on fill pixels, without per-pixel tests
    planes = np.pad(pixels.transpose(2, 0, 1), ((0, 0), (2, 2), (2, 2)), constant_values=BLIP_FILL)
    planes = planes.reshape(pixels.shape[2], -1).astype(np.int32)
    stride = w + 4
    corner = ((sy >> 5).clip(-2, h) + 2) * stride + (sx >> 5).clip(-2, w) + 2
    top = (32 - fx) * np.take(planes, corner, axis=1) + fx * np.take(planes, corner + 1, axis=1)
    bottom = (32 - fx) * np.take(planes, corner + stride, axis=1) + fx * np.take(planes, corner + stride + 1, axis=1)
    return (((32 - fy) * top + fy * bottom + 512) >> 10).astype(np.uint8).transpose(1, 2, 0)


def _blip_op(pixels: np.ndarray, name: str, level: float) -> np.ndarray:
    """BLIP's RandomAugment op `name` on uint8 [H, W, 3]; `level` = ±magnitude/10, its sign drawn per op."""
    h, w = pixels.shape[:2]
    if name == "autocontrast":
        return np.stack([_blip_autocontrast(pixels[..., k]) for k in range(pixels.shape[2])], axis=-1)
    if name == "equalize":  # BLIP's equalize_func reproduces PIL's formula
        return np.asarray(ImageOps.equalize(Image.fromarray(pixels)))
    factor = abs(level) * 1.8 + 0.1  # 1.0 at magnitude 5: Brightness and Sharpness then change nothing
    if name == "brightness":
        return (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)[pixels]
    if name == "sharpness":
        return _blip_sharpness(pixels, factor)
    if name == "rotate":  # cv2.getRotationMatrix2D((w/2, h/2), degrees, 1): positive is anticlockwise
        angle = math.radians(level * 30)
        cos, sin = math.cos(angle), math.sin(angle)
        forward = [[cos, sin, (1 - cos) * w / 2 - sin * h / 2], [-sin, cos, sin * w / 2 + (1 - cos) * h / 2]]
        return _warp(pixels, np.array(forward))
    forward = {  # BLIP builds these in float32
        "shear_x": [[1, level * 0.3, 0], [0, 1, 0]],
        "shear_y": [[1, 0, 0], [level * 0.3, 1, 0]],
        "translate_x": [[1, 0, -level * 10], [0, 1, 0]],
        "translate_y": [[1, 0, 0], [0, 1, -level * 10]],
    }[name]
    return _warp(pixels, np.array(forward, np.float32))


def apply(image: Image.Image, augmentation: Augmentation, size: int) -> Image.Image:
    """Crop + bicubic resize to size×size (a whole-pixel crop is cut out first, as torchvision does; a fractional
    one is resampled in one step), then the ops, then the flip (before the ops for the "blip" set, as in the
    authors' transform)."""
    if augmentation.pixel_crop is not None:
        out = image.crop(augmentation.pixel_crop).resize((size, size), Image.Resampling.BICUBIC)
    else:
        w, h = image.size
        left, top, right, bottom = augmentation.crop
        box = (left * w, top * h, right * w, bottom * h)
        out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if augmentation.op_set == "blip":
        pixels = np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if augmentation.flip else out)
        for name, level in augmentation.ops:
            pixels = _blip_op(pixels, name, level)
        return Image.fromarray(pixels)
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
