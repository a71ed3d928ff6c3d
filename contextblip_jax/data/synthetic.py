"""Generated IRCD data in the exact ImageCoDe layout: the data of the CPU main job and of the tests.

    python -m contextblip_jax.data.synthetic --root=PATH [--seed=0 --train_sets=400 --valid_sets=100 ...]

Each set holds 10 small JPEGs of coloured shapes on a plain background, and each description names the
attributes that single out its target among the 10, in ordinary words ("two blue triangles on the left").

- Static sets (`open-images-<n>_<hex>`, files img0..img9): 10 different (colour, shape, position) combinations
  with the same count; the description names colour, shape and position.
- Video-like sets (`MSR-VTT-`, `video-storytelling-`, `YouCook-` prefixes): one colour and shape for the whole
  clip; frame by frame the count or the position changes by one step, so the 10 frames are distinct states of a
  smooth "video". Frames are saved under non-contiguous frame numbers (img31, img38, img50, ...), so the target
  is the k-th frame in sorted order and not img{k}.jpg, exactly as in ImageCoDe.

The cues (colour, shape, left/middle/right, one to four objects) are large and clean, so a small model learns
them on a CPU in minutes; mirror symmetry of the shapes keeps a text-aware flip (left ↔ right) truthful.
At the default 64 px (48 px at least) the attributes can be read back from the pixels exactly (see the tests);
JPEGs are written without chroma subsampling so that colours do not bleed between neighbouring shapes.
Everything is drawn from one `np.random.Generator(seed)`: the same seed writes the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from contextblip_jax.data import imagecode

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 40),
    "purple": (135, 55, 175),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
COUNTS = ("one", "two", "three", "four")
VIDEO_PREFIXES = ("MSR-VTT-", "video-storytelling-", "YouCook-")
_POSITION_X = {"left": 0.2, "middle": 0.5, "right": 0.8}
_POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_TEMPLATES = (
    "{count} {colour} {shapes} {pos}",
    "there {be} {count} {colour} {shapes} {pos} of the picture",
    "the picture shows {count} {colour} {shapes} {pos}",
    "{count} {colour} {shapes} can be seen {pos} and nothing else",
    "in this image {count} {colour} {shapes} {be} {pos}",
)

Scene = tuple[str, str, str, int]  # colour, shape, position, count


def describe(scene: Scene, template: int = 0) -> str:
    colour, shape, position, count = scene
    return _TEMPLATES[template].format(
        count=COUNTS[count - 1],
        colour=colour,
        shapes=shape if count == 1 else shape + "s",
        pos=_POSITION_PHRASE[position],
        be="is" if count == 1 else "are",
    )


def render(scene: Scene, size: int, background: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """The scene's objects stacked in a column at the left, middle or right third, moved by a pixel or two.

    Sizes keep four objects apart by at least 0.06 of the side, so they never touch, even after JPEG.
    """
    colour, shape, position, count = scene
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = 0.07 * size
    x = _POSITION_X[position] * size + rng.uniform(-0.03, 0.03) * size
    shift = rng.uniform(-0.02, 0.02) * size
    for i in range(count):
        y = (i + 1) / (count + 1) * size + shift
        box = (x - radius, y - radius, x + radius, y + radius)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=COLOURS[colour])
    return image


def _static_scenes(rng: np.random.Generator) -> list[Scene]:
    count = int(rng.integers(1, 3))
    combos = [(c, s, p, count) for c in COLOURS for s in SHAPES for p in POSITIONS]
    return [combos[i] for i in rng.choice(len(combos), imagecode.NUM_CANDIDATES, replace=False)]


def _video_scenes(rng: np.random.Generator) -> list[Scene]:
    """A window of 10 consecutive states on a snake path over (count, position): one step per frame."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    path = []
    for count in range(1, len(COUNTS) + 1):
        row = POSITIONS if count % 2 else POSITIONS[::-1]
        path += [(colour, shape, position, count) for position in row]
    if rng.random() < 0.5:
        path.reverse()
    start = int(rng.integers(len(path) - imagecode.NUM_CANDIDATES + 1))
    return path[start : start + imagecode.NUM_CANDIDATES]


def _frame_numbers(rng: np.random.Generator) -> list[int]:
    gaps = rng.integers(2, 15, size=imagecode.NUM_CANDIDATES - 1)
    start = int(rng.integers(0, 300))
    return [start, *(start + np.cumsum(gaps)).tolist()]


def _write_set(
    root: str, name: str, scenes: Sequence[Scene], frames: Sequence[int], size: int, rng: np.random.Generator
) -> None:
    folder = imagecode.set_dir(root, name)
    os.makedirs(folder)
    background = tuple(int(v) for v in rng.integers(200, 246, size=3))
    for scene, frame in zip(scenes, frames, strict=True):
        render(scene, size, background, rng).save(os.path.join(folder, f"img{frame}.jpg"), quality=95, subsampling=0)


def _clear(root: str, overwrite: bool) -> None:
    existing = [
        p for p in [*imagecode.SPLIT_FILES.values(), imagecode.IMAGE_DIR] if os.path.exists(os.path.join(root, p))
    ]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds {existing}; pass overwrite=True (--overwrite) to replace them")
    for name in existing:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def generate(
    root: str,
    seed: int = 0,
    num_train_sets: int = 400,
    num_valid_sets: int = 100,
    num_test_sets: int = 100,
    image_size: int = 64,
    video_fraction: float = 0.7,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Writes the three split files and image-sets/ under `root`; returns the counts the doctor should print."""
    os.makedirs(root, exist_ok=True)
    _clear(root, overwrite)
    rng = np.random.default_rng(seed)
    counts = {}
    number = 0
    for split, num_sets in (("train", num_train_sets), ("valid", num_valid_sets), ("test", num_test_sets)):
        annotations: dict[str, object] = {}
        split_counts = {"sets": num_sets, "descriptions": 0, "video_descriptions": 0, "static_descriptions": 0}
        for _ in range(num_sets):
            number += 1
            video = rng.random() < video_fraction
            if video:
                prefix = VIDEO_PREFIXES[number % len(VIDEO_PREFIXES)]
                name, scenes, frames = f"{prefix}synthetic{number:05d}", _video_scenes(rng), _frame_numbers(rng)
            else:
                name = f"{imagecode.STATIC_MARKER}-{number}_{rng.bytes(8).hex()}"
                scenes, frames = _static_scenes(rng), list(range(imagecode.NUM_CANDIDATES))
            _write_set(root, name, scenes, frames, image_size, rng)
            targets = rng.choice(imagecode.NUM_CANDIDATES, int(rng.integers(1, 4)), replace=False).tolist()
            texts = {t: describe(scenes[t], int(rng.integers(len(_TEMPLATES)))) for t in targets}
            annotations[name] = list(texts.values()) if split == "test" else {str(t): d for t, d in texts.items()}
            split_counts["descriptions"] += len(targets)
            split_counts["video_descriptions" if video else "static_descriptions"] += len(targets)
        with open(imagecode.split_path(root, split), "w", encoding="utf-8") as f:
            json.dump(annotations, f, indent=1)
        counts[split] = split_counts
    return counts


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    os.makedirs(_ROOT.value, exist_ok=True)
    counts = generate(
        _ROOT.value,
        seed=_SEED.value,
        num_train_sets=_TRAIN.value,
        num_valid_sets=_VALID.value,
        num_test_sets=_TEST.value,
        image_size=_SIZE.value,
        video_fraction=_VIDEO.value,
        overwrite=_OVERWRITE.value,
    )
    print(json.dumps({"root": _ROOT.value, "splits": counts}, indent=2))


if __name__ == "__main__":
    from absl import app, flags

    _ROOT = flags.DEFINE_string("root", None, "Folder to write the ImageCoDe layout into.", required=True)
    _SEED = flags.DEFINE_integer("seed", 0, "Seed of everything generated.")
    _TRAIN = flags.DEFINE_integer("train_sets", 400, "Image sets in train_data.json.")
    _VALID = flags.DEFINE_integer("valid_sets", 100, "Image sets in valid_data.json.")
    _TEST = flags.DEFINE_integer("test_sets", 100, "Image sets in test_data_unlabeled.json.")
    _SIZE = flags.DEFINE_integer("image_size", 64, "Side of the square JPEGs, in pixels.")
    _VIDEO = flags.DEFINE_float("video_fraction", 0.7, "Fraction of video-like sets (ImageCoDe: about 0.75).")
    _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the split files and image-sets/ if present.")
    app.run(_main)
