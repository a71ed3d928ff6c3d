"""MMVP-VLM on a generated miniature: pairs, image paths, scoring, and errors naming the line or image."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from contextblip_jax.data import mmvp
from contextblip_jax.data.errors import DataError
from tests.data.helpers import write_jpeg

CATEGORIES = ("Orientation and Direction", "Color and Appearance")


def miniature(root: str, rows: list[tuple[str, str, str]] | None = None) -> str:
    """2 categories x 2 pairs, ids 1..8 as in the real file; images under `MLLM_VLM Images/<category>/<id>.jpg`."""
    if rows is None:
        rows = []
        for c, category in enumerate(CATEGORIES):
            for p in range(2):
                first = 4 * c + 2 * p + 1
                rows += [
                    (str(first), category, f"statement {first}"),
                    (str(first + 1), category, f"statement {first + 1}"),
                ]
    with open(os.path.join(root, mmvp.QUESTIONS_FILE), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question ID", "Type", "Statement"])
        writer.writerows(rows)
    for qid, category, _ in rows:
        write_jpeg(os.path.join(root, mmvp.IMAGE_DIR, category, f"{qid}.jpg"), (int(qid) * 20, 0, 0), size=8)
    return root


def test_reads_pairs_in_file_order(tmp_path):
    pairs = mmvp.read_pairs(miniature(str(tmp_path)))
    assert [(p.category, p.question_ids) for p in pairs] == [
        (CATEGORIES[0], (1, 2)),
        (CATEGORIES[0], (3, 4)),
        (CATEGORIES[1], (5, 6)),
        (CATEGORIES[1], (7, 8)),
    ]
    assert pairs[2].texts == ("a photo of statement 5", "a photo of statement 6")
    assert pairs[2].image_paths[1] == os.path.join(str(tmp_path), "MLLM_VLM Images", CATEGORIES[1], "6.jpg")


def test_a_pair_counts_only_when_both_statements_pick_their_image(tmp_path):
    pairs = mmvp.read_pairs(miniature(str(tmp_path)))
    right, one_wrong, both_same = (
        np.array([[0.9, 0.1], [0.2, 0.8]]),
        np.array([[0.9, 0.1], [0.9, 0.8]]),
        np.ones((2, 2)),
    )
    assert mmvp.pair_correct(right) and not mmvp.pair_correct(one_wrong) and not mmvp.pair_correct(both_same)
    scores = [right, one_wrong, right, right]
    assert mmvp.accuracy(pairs, scores) == {CATEGORIES[0]: 0.5, CATEGORIES[1]: 1.0, "all": 0.75}
    with pytest.raises(ValueError, match="shape"):
        mmvp.pair_correct(np.ones(3))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("1", "A", "s1")], "must come in pairs"),
        ([("1", "A", "s1"), ("3", "A", "s3")], "not a pair"),
        ([("1", "A", "s1"), ("2", "B", "s2")], "not a pair"),
        ([("x", "A", "s1"), ("2", "A", "s2")], "line 2: question id 'x'"),
        ([("1", "A"), ("2", "A", "s2")], "line 2: expected"),
    ],
)
def test_malformed_questions_name_the_line(tmp_path, rows, message):
    root = str(tmp_path)
    with open(os.path.join(root, mmvp.QUESTIONS_FILE), "w", newline="") as f:
        csv.writer(f).writerows([("Question ID", "Type", "Statement"), *rows])
    with pytest.raises(DataError, match=message):
        mmvp.read_pairs(root, check_images=False)


def test_missing_image_is_named(tmp_path):
    root = miniature(str(tmp_path))
    os.remove(os.path.join(root, mmvp.IMAGE_DIR, CATEGORIES[1], "7.jpg"))
    with pytest.raises(DataError, match=r"7\.jpg"):
        mmvp.read_pairs(root)


def test_statements_are_cleaned_only_when_the_run_cleans_its_texts(tmp_path):
    root = miniature(str(tmp_path), [("1", "Color", "The dog's nose, left."), ("2", "Color", "A black-and-white cat!")])
    assert mmvp.read_pairs(root)[0].texts == ("a photo of The dog's nose, left.", "a photo of A black-and-white cat!")
    cleaned = mmvp.read_pairs(root, pre_caption_words=30)[0].texts
    assert cleaned == ("a photo of the dogs nose left", "a photo of a black and white cat")
