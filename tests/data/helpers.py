"""Hand-made ImageCoDe folders for exact cases: every image a solid colour, so a test can tell which one it got."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from PIL import Image


def colour_of(frame: int) -> tuple[int, int, int]:
    """A distinct colour per frame number, far enough apart to survive JPEG."""
    return ((frame * 37) % 256, (frame * 91 + 40) % 256, (frame * 53 + 90) % 256)


def write_jpeg(path: str, colour: tuple[int, int, int], size: int = 16) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG", quality=95)


def write_set(root: str, name: str, frames: Sequence[int]) -> None:
    for frame in frames:
        write_jpeg(os.path.join(root, "image-sets", name, f"img{frame}.jpg"), colour_of(frame))


def write_split(root: str, file_name: str, content: object) -> None:
    with open(os.path.join(root, file_name), "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))


def make_folder(root: str, sets: Mapping[str, Sequence[int]], train: object, valid: object = None, test: object = None):
    for name, frames in sets.items():
        write_set(root, name, frames)
    for file_name, content in (
        ("train_data.json", train),
        ("valid_data.json", valid),
        ("test_data_unlabeled.json", test),
    ):
        if content is not None:
            write_split(root, file_name, content)
    return root
