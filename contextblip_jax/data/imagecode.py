"""The ImageCoDe folder as users download it, read into one example per description.

Layout (as downloaded from Zenodo record 6518944 or the Hugging Face dataset `BennoKrojer/ImageCoDe`):

    <root>/train_data.json            {set_name: {"<target 0..9>": description, ...}}
    <root>/valid_data.json            same
    <root>/test_data_unlabeled.json   {set_name: [description, ...]}   (no targets)
    <root>/image-sets/<set_name>/imgX.jpg   10 JPEGs per set

The target index is the position in the set's 10 files **sorted by the integer X**: video sets are named by frame
number (img0, img7, img19, ...), so `img{target}.jpg` is usually not the target, and the sort also puts frames in
temporal order for the inter-context encoder. A set is static iff its name contains `open-images`.

`ImageCodeSource` is the direct grain source over the folder (no build step); `records.py` writes the same
examples to array_record files. Run `python -m contextblip_jax.data.doctor --root=PATH` to check a download.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from absl import logging

from contextblip_jax.data.errors import DataError, ErrorPolicy, unreadable_record

SPLIT_FILES = {"train": "train_data.json", "valid": "valid_data.json", "test": "test_data_unlabeled.json"}
LABELLED_SPLITS = ("train", "valid")
IMAGE_DIR = "image-sets"
NUM_CANDIDATES = 10
STATIC_MARKER = "open-images"
NO_TARGET = -1
_IMAGE_NAME = re.compile(r"img(\d+)\.jpg")
_INTEGER = re.compile(r"[+-]?[0-9]+")


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One description as the JSON file gives it; `description_index` is its position in its set (file order)."""

    set_name: str
    description: str
    target: int | None
    description_index: int


@dataclasses.dataclass(frozen=True)
class Example:
    """One description with its set's 10 images in target-index order; `target` is -1 on the test split."""

    set_name: str
    description: str
    description_index: int
    target: int
    is_video: bool
    image_paths: tuple[str, ...]

    @property
    def has_target(self) -> bool:
        return self.target != NO_TARGET


def is_static(set_name: str) -> bool:
    return STATIC_MARKER in set_name


def split_path(root: str, split: str) -> str:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown ImageCoDe split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    return os.path.join(root, SPLIT_FILES[split])


def set_dir(root: str, set_name: str) -> str:
    return os.path.join(root, IMAGE_DIR, set_name)


def frame_number(file_name: str) -> int | None:
    """X of `imgX.jpg`, or None for any other file name."""
    match = _IMAGE_NAME.fullmatch(file_name)
    return int(match.group(1)) if match else None


def read_json(path: str) -> Any:
    """The parsed file, or a `DataError` naming it when it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(path, f"malformed JSON: {error}") from error


def _parse_target(key: Any, path: str, set_name: str) -> int:
    if not isinstance(key, str) or not _INTEGER.fullmatch(key.strip()):
        raise DataError(path, f"target {key!r} is not an integer", set_name)
    target = int(key)
    if not 0 <= target < NUM_CANDIDATES:
        raise DataError(path, f"target {target} is outside 0-{NUM_CANDIDATES - 1}", set_name)
    return target


def _parse_description(text: Any, path: str, set_name: str) -> str:
    if not isinstance(text, str):
        raise DataError(path, f"description is a {type(text).__name__}, not a string", set_name)
    if not text.strip():
        raise DataError(path, "empty description", set_name)
    return text.strip()


def is_plain_name(name: str) -> bool:
    """A single folder name: no separators, no `.` or `..`, no NUL; a set named `../x` or `/etc` would make the
    reader open files outside the dataset."""
    return name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0")) and not os.path.isabs(name)


def parse_annotations(data: Any, path: str, split: str, policy: ErrorPolicy) -> list[Annotation]:
    """Validates a loaded split file: labelled splits map targets to descriptions, test lists descriptions.

    A damaged description is raised or (skip policy) dropped alone; a set whose value has the wrong type is
    dropped whole. A file whose top level is not an object is always an error: nothing in it can be trusted.
    """
    if not isinstance(data, dict):
        raise DataError(path, f"top level is a {type(data).__name__}, expected an object of image sets")
    labelled = split in LABELLED_SPLITS
    annotations = []
    for set_name, entries in data.items():
        if not isinstance(set_name, str) or not set_name.strip():
            policy.handle(DataError(path, f"set name {set_name!r} is not a non-empty string"))
            continue
        if not is_plain_name(set_name):
            problem = f"set name {set_name!r} is not a plain folder name (it would leave {IMAGE_DIR}/)"
            policy.handle(DataError(path, problem))
            continue
        expected = dict if labelled else list
        if not isinstance(entries, expected) or not entries:
            kind = "target → description object" if labelled else "list of descriptions"
            policy.handle(DataError(path, f"expected a non-empty {kind}, got {entries!r:.80}", set_name))
            continue
        items = entries.items() if labelled else ((None, text) for text in entries)
        for index, (key, text) in enumerate(items):
            try:
                target = _parse_target(key, path, set_name) if labelled else None
                annotations.append(Annotation(set_name, _parse_description(text, path, set_name), target, index))
            except DataError as error:
                policy.handle(error)
    return annotations


def list_set_images(root: str, set_name: str) -> list[str]:
    """The set's image paths sorted by frame number; a `DataError` unless there are exactly 10 `imgX.jpg`."""
    folder = set_dir(root, set_name)
    if os.path.basename(os.path.normpath(set_name)) != set_name or set_name in ("", ".", ".."):
        raise DataError(folder, f"set name {set_name!r} is not a plain folder name", set_name)
    try:
        names = os.listdir(folder)
    except FileNotFoundError as error:
        raise DataError(folder, "image set folder is missing", set_name) from error
    except NotADirectoryError as error:
        raise DataError(folder, "image set path is not a folder", set_name) from error
    except (OSError, ValueError) as error:  # permissions, a NUL byte in the name, ...
        raise DataError(folder, f"cannot list the image set: {error}", set_name) from error
    numbered = sorted((number, name) for name in names if (number := frame_number(name)) is not None)
    if len(numbered) != NUM_CANDIDATES:
        raise DataError(folder, f"has {len(numbered)} imgX.jpg images, expected {NUM_CANDIDATES}", set_name)
    numbers = [number for number, _ in numbered]
    if len(set(numbers)) != len(numbers):
        raise DataError(folder, f"frame numbers repeat: {[name for _, name in numbered]}", set_name)
    paths = [os.path.join(folder, name) for _, name in numbered]
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(path, "image is not a regular file", set_name)
    return paths


def read_split(root: str, split: str, on_error: str = "raise") -> list[Example]:
    """All examples of a split in file order, with image files listed and counted (not decoded).

    Decoding happens in the pipeline (or in the doctor, which decodes every image once).
    """
    path = split_path(root, split)
    policy = ErrorPolicy(on_error, f"ImageCoDe {split} ({path})")
    annotations = parse_annotations(read_json(path), path, split, policy)
    per_set: dict[str, list[Annotation]] = {}
    for annotation in annotations:
        per_set.setdefault(annotation.set_name, []).append(annotation)
    examples = []
    for set_name, set_annotations in per_set.items():
        try:
            images = tuple(list_set_images(root, set_name))
        except DataError as error:
            policy.handle(error, examples=len(set_annotations))
            continue
        for a in set_annotations:
            target = NO_TARGET if a.target is None else a.target
            examples.append(
                Example(set_name, a.description, a.description_index, target, not is_static(set_name), images)
            )
    policy.log_summary()
    logging.info("ImageCoDe %s: %d descriptions from %d sets in %s", split, len(examples), len(per_set), root)
    return examples


def example_record(example: Example, example_id: int) -> dict[str, Any]:
    """The element both sources yield: metadata plus the 10 JPEG files' bytes (decoded later, in the pipeline)."""
    images = []
    for path in example.image_paths:
        try:
            with open(path, "rb") as f:
                images.append(f.read())
        except OSError as error:
            raise DataError(path, f"cannot read image: {error}", example.set_name) from error
    return {
        "example_id": example_id,
        "set_name": example.set_name,
        "description": example.description,
        "description_index": example.description_index,
        "target": example.target,
        "is_video": example.is_video,
        "image_names": tuple(os.path.basename(p) for p in example.image_paths),
        "images": tuple(images),
    }


class ImageCodeSource:
    """Random-access grain source over the downloaded folder: `source[i]` is `example_record` of example i, or
    `errors.unreadable_record` when its images cannot be read (the transform then raises or skips)."""

    def __init__(self, root: str, split: str, on_error: str = "raise", examples: Sequence[Example] | None = None):
        self.root, self.split = root, split
        self.examples = list(examples) if examples is not None else read_split(root, split, on_error)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return example_record(self.examples[index], index)
        except DataError as error:
            return unreadable_record(index, error)

    def __repr__(self) -> str:
        return f"ImageCodeSource(root={self.root!r}, split={self.split!r}, examples={len(self)})"
