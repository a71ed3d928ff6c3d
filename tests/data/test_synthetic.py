"""Generated IRCD data: exact layout, determinism, and descriptions that single out their target image."""

from __future__ import annotations

import filecmp
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from contextblip_jax.data import imagecode, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def see(path: str) -> tuple[str, str, str, int]:
    """Reads (colour, shape, position, count) back from the pixels alone: an oracle independent of the generator."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    size = pixels.shape[1]
    background = np.median(pixels.reshape(-1, 3), axis=0)
    labels, n = ndimage.label(np.abs(pixels - background).max(-1) > 60)
    blobs = [labels == k for k in range(1, n + 1) if (labels == k).sum() >= 10]
    colours, shapes, xs = set(), set(), []
    for blob in blobs:
        mean = pixels[blob].mean(0)
        colours.add(min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - mean).sum()))
        ys, x = np.nonzero(blob)
        fill = blob.sum() / ((ys.max() - ys.min() + 1) * (x.max() - x.min() + 1))
        shapes.add("square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle")
        xs.append(x.mean() / size)
    assert len(colours) == len(shapes) == 1, path
    position = "left" if np.mean(xs) < 1 / 3 else "middle" if np.mean(xs) < 2 / 3 else "right"
    return colours.pop(), shapes.pop(), position, len(blobs)


def parse(description: str) -> tuple[str, str, str, int]:
    words = description.replace(",", "").split()
    colour = next(w for w in words if w in synthetic.COLOURS)
    shape = next(w.rstrip("s") for w in words if w.rstrip("s") in synthetic.SHAPES)
    position = next(w for w in words if w in synthetic.POSITIONS)
    count = next(synthetic.COUNTS.index(w) + 1 for w in words if w in synthetic.COUNTS)
    return colour, shape, position, count


def test_each_description_matches_its_target_and_no_other_image(tmp_path):
    root = str(tmp_path)
    counts = synthetic.generate(root, seed=5, num_train_sets=6, num_valid_sets=3, num_test_sets=3, image_size=64)
    assert counts["train"]["video_descriptions"] and counts["train"]["static_descriptions"]
    for split in imagecode.SPLIT_FILES:
        examples = imagecode.read_split(root, split)
        seen = {}
        for example in examples:
            scenes = seen.setdefault(example.set_name, [see(p) for p in example.image_paths])
            assert len(set(scenes)) == 10  # the 10 candidates all differ
            matches = [k for k, scene in enumerate(scenes) if scene == parse(example.description)]
            assert len(matches) == 1, (example.set_name, example.description, scenes)
            if split != "test":
                assert matches == [example.target]
            if example.is_video:  # a smooth clip: consecutive frames differ in one attribute by one step
                for a, b in itertools.pairwise(scenes):
                    steps = abs(a[3] - b[3]) + abs(synthetic.POSITIONS.index(a[2]) - synthetic.POSITIONS.index(b[2]))
                    assert a[:2] == b[:2] and steps == 1


def test_layout_is_exactly_imagecode(generated_root):
    assert sorted(os.listdir(generated_root)) == [
        "image-sets",
        "test_data_unlabeled.json",
        "train_data.json",
        "valid_data.json",
    ]
    for split, file_name in imagecode.SPLIT_FILES.items():
        with open(os.path.join(generated_root, file_name)) as f:
            data = json.load(f)
        for name, entries in data.items():
            files = os.listdir(imagecode.set_dir(generated_root, name))
            assert len(files) == 10 and all(imagecode.frame_number(f) is not None for f in files)
            if split == "test":
                assert isinstance(entries, list) and 1 <= len(entries) <= 3
            else:
                assert 1 <= len(entries) <= 3 and all(k in [str(i) for i in range(10)] for k in entries)
            with Image.open(os.path.join(imagecode.set_dir(generated_root, name), files[0])) as image:
                assert image.format == "JPEG" and image.size == (32, 32)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    small = {"num_train_sets": 3, "num_valid_sets": 1, "num_test_sets": 1, "image_size": 16}
    a, b, c = (str(tmp_path / name) for name in "abc")
    synthetic.generate(a, seed=11, **small)
    synthetic.generate(b, seed=11, **small)
    synthetic.generate(c, seed=12, **small)
    comparison = filecmp.dircmp(a, b)
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for name in os.listdir(os.path.join(a, "image-sets")):
        _, mismatch, errors = filecmp.cmpfiles(
            os.path.join(a, "image-sets", name),
            os.path.join(b, "image-sets", name),
            os.listdir(os.path.join(a, "image-sets", name)),
            shallow=False,
        )
        assert not mismatch and not errors
    assert not filecmp.cmp(os.path.join(a, "train_data.json"), os.path.join(c, "train_data.json"), shallow=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.generate(a, seed=11, **small)
    synthetic.generate(a, seed=12, overwrite=True, **small)
    assert filecmp.cmp(os.path.join(a, "train_data.json"), os.path.join(c, "train_data.json"), shallow=False)


def test_cli_writes_and_reports_counts(tmp_path):
    root = str(tmp_path / "out")
    command = [
        sys.executable,
        "-m",
        "contextblip_jax.data.synthetic",
        f"--root={root}",
        "--train_sets=2",
        "--valid_sets=1",
        "--test_sets=1",
        "--image_size=16",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {split: c["sets"] for split, c in summary["splits"].items()} == {"train": 2, "valid": 1, "test": 1}
    assert len(imagecode.read_split(root, "train")) == summary["splits"]["train"]["descriptions"]
