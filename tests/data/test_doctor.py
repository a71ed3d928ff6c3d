"""The dataset doctor CLI: exact counts on a generated folder; every damaged set named on a damaged copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from contextblip_jax.data import doctor, imagecode
from tests.data.helpers import write_jpeg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_doctor(root: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "contextblip_jax.data.doctor", f"--root={root}", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_prints_the_exact_counts_and_exits_zero(generated):
    root, counts = generated
    result = run_doctor(root)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["splits"] == counts
    assert summary["damaged_sets"] == 0 and summary["problems"] == []


@pytest.fixture
def damaged(generated_root, tmp_path) -> tuple[str, dict[str, str]]:
    """A copy with one kind of damage per set; returns (root, {set name: expected problem text})."""
    root = str(tmp_path / "copy")
    shutil.copytree(generated_root, root)
    with open(imagecode.split_path(root, "train")) as f:
        train = json.load(f)
    with open(imagecode.split_path(root, "valid")) as f:
        valid = json.load(f)
    names = list(train)
    expected = {}

    def image(name: str, k: int) -> str:
        return imagecode.list_set_images(root, name)[k]

    os.remove(image(names[0], 4))
    expected[names[0]] = "has 9 imgX.jpg images"
    with open(image(names[1], 2), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    expected[names[1]] = "cannot decode JPEG"
    Image.new("RGB", (8, 8)).save(image(names[2], 7), "PNG")  # a PNG named img*.jpg
    expected[names[2]] = "not a JPEG file"
    write_jpeg(os.path.join(imagecode.set_dir(root, names[3]), "img999.jpg"), (1, 2, 3))
    expected[names[3]] = "has 11 imgX.jpg images"
    train[names[4]] = {"12": "out of range", **train[names[4]]}
    expected[names[4]] = "target 12 is outside 0-9"
    train[names[5]] = {"x": "not a number"}
    expected[names[5]] = "'x' is not an integer"
    first_valid = next(iter(valid))
    valid[first_valid] = {"0": "  "}
    expected[first_valid] = "empty description"
    with open(imagecode.split_path(root, "train"), "w") as f:
        json.dump(train, f)
    with open(imagecode.split_path(root, "valid"), "w") as f:
        json.dump(valid, f)
    return root, expected


def test_damaged_copy_exits_nonzero_naming_every_damaged_set(damaged):
    root, expected = damaged
    result = run_doctor(root)
    assert result.returncode != 0
    summary = json.loads(result.stdout)
    assert summary["damaged_sets"] == len(expected)
    for name, problem in expected.items():
        lines = [line for line in result.stderr.splitlines() if f"set {name} " in line]
        assert len(lines) == 1 and problem in lines[0], (name, problem, result.stderr)
    assert f"{len(expected)} damaged set(s)" in result.stderr


def test_missing_split_file_is_reported_and_splits_can_be_chosen(generated_root, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(generated_root, root)
    os.remove(imagecode.split_path(root, "test"))
    report = doctor.diagnose(root)
    assert [(p.split, p.problem) for p in report.problems] == [("test", "file not found")]
    assert set(report.counts) == {"train", "valid"}
    result = run_doctor(root, "--splits=train,valid")
    assert result.returncode == 0, result.stderr
