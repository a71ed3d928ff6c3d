"""BLIP-format caption files (COCO and Visual Genome) for stage-1 pre-training.

Each annotation file is a JSON list of `{"image": "<path relative to the image root>", "caption": text}`; some
files give a list of captions per entry instead of one text. Extra fields (`image_id`, ...) are ignored.
Entries are grouped per image. By default one example is one image with all its captions, and the pipeline
draws one caption per visit: each image once per epoch, and records store each JPEG once. `per_caption` makes
one example per (image, caption) pair instead, as the authors' `pretrain_dataset` iterates: an epoch is then
one pass over the captions.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from contextblip_jax.data.errors import DataError, ErrorPolicy, unreadable_record
from contextblip_jax.data.imagecode import read_json


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    image: str  # the relative path as the annotation file writes it
    image_path: str  # the file on disk
    captions: tuple[str, ...]


def _parse_entry(entry: Any, index: int, path: str) -> tuple[str, list[str]]:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise DataError(path, f"is a {type(entry).__name__}, expected an object with image and caption", where)
    image = entry.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DataError(path, f"caption entry without an image (image = {image!r:.60})", where)
    if os.path.isabs(image) or ".." in image.replace("\\", "/").split("/") or "\0" in image:
        raise DataError(path, f"image {image!r:.80} is not a path inside the image root", where)
    caption = entry.get("caption")
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise DataError(path, f"image {image}: caption must be a non-empty text or list of texts", where)
    return image.strip(), [c.strip() for c in captions]


def parse_captions(data: Any, path: str, policy: ErrorPolicy) -> list[tuple[str, list[str]]]:
    """(image, captions) per valid entry of a loaded annotation file, in file order."""
    if not isinstance(data, list):
        raise DataError(path, f"top level is a {type(data).__name__}, expected a list of caption entries")
    parsed = []
    for index, entry in enumerate(data):
        try:
            parsed.append(_parse_entry(entry, index, path))
        except DataError as error:
            policy.handle(error)
    return parsed


def read_captions(
    annotation_files: Sequence[str], image_root: str, on_error: str = "raise", check_images: bool = True
) -> list[CaptionedImage]:
    """Images with their captions from all files, first appearance order; missing images are damage too."""
    grouped: dict[str, list[str]] = {}
    policies = []
    for path in annotation_files:
        policy = ErrorPolicy(on_error, f"captions {path}")
        policies.append(policy)
        for image, captions in parse_captions(read_json(path), path, policy):
            grouped.setdefault(image, []).extend(captions)
    examples = []
    missing = ErrorPolicy(on_error, f"caption images under {image_root}")
    for image, captions in grouped.items():
        image_path = os.path.join(image_root, image)
        if check_images and not os.path.isfile(image_path):
            missing.handle(DataError(image_path, "image not found", image), examples=1)
            continue
        examples.append(CaptionedImage(image, image_path, tuple(captions)))
    for policy in [*policies, missing]:
        policy.log_summary()
    logging.info(
        "captions: %d images, %d captions from %d file(s)",
        len(examples),
        sum(len(e.captions) for e in examples),
        len(annotation_files),
    )
    return examples


def caption_record(example: CaptionedImage, example_id: int) -> dict[str, Any]:
    try:
        with open(example.image_path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise DataError(example.image_path, f"cannot read image: {error}", example.image) from error
    return {"example_id": example_id, "image_name": example.image, "captions": example.captions, "image": data}


def caption_pairs(examples: Sequence[CaptionedImage]) -> np.ndarray:
    """[captions, 2] (image index, caption index within the image) of every caption, in order: an index kept
    as arrays because COCO + VG have over a million captions and grain copies the source into every worker."""
    counts = np.array([len(e.captions) for e in examples], np.int64)
    image = np.repeat(np.arange(len(examples)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([image, np.arange(len(image)) - first], axis=1)


class CaptionSource:
    """Random-access grain source over caption files and an image folder: `source[i]` = `caption_record`, or
    `errors.unreadable_record` when the image cannot be read (the transform then raises or skips).

    per_caption: element i is the i-th (image, caption) pair, its record holding that caption only, so the
    transform uses it; otherwise element i is image i with all its captions."""

    def __init__(
        self, annotation_files: Sequence[str], image_root: str, on_error: str = "raise", per_caption: bool = False
    ):
        self.annotation_files, self.image_root = list(annotation_files), image_root
        self.examples = read_captions(self.annotation_files, image_root, on_error)
        self.pairs = caption_pairs(self.examples) if per_caption else None

    def __len__(self) -> int:
        return len(self.examples) if self.pairs is None else len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index] if self.pairs is None else self._pair(index)
        try:
            return caption_record(example, index)
        except DataError as error:
            return unreadable_record(index, error)

    def _pair(self, index: int) -> CaptionedImage:
        image, caption = (int(i) for i in self.pairs[index])
        example = self.examples[image]
        return dataclasses.replace(example, captions=(example.captions[caption],))

    def __repr__(self) -> str:
        unit = "images" if self.pairs is None else "captions"
        return f"CaptionSource(files={self.annotation_files!r}, image_root={self.image_root!r}, {unit}={len(self)})"
