"""Accuracy and the leaderboard file from scored predictions, against values written out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contextblip_jax import parallel
from contextblip_jax.data.imagecode import Example
from contextblip_jax.evaluation.scoring import accuracy, accuracy_by, leaderboard, score_split


def example(set_name: str, index: int) -> Example:
    return Example(set_name, f"text {index}", index, -1, "open-images" not in set_name, ())


EXAMPLES = [  # file order: set "b-video" first, then the static set, descriptions in file order
    example("b-video", 0),
    example("b-video", 1),
    example("open-images-a", 0),
    example("b-video", 2),
    example("open-images-a", 1),
]


def test_leaderboard_lists_each_sets_predictions_in_file_order():
    scored = {  # the evaluation order is shuffled; example_id says which description each row is
        "example_id": np.array([4, 0, 3, 2, 1]),
        "prediction": np.array([8, 5, 9, 1, 6]),
    }
    board = leaderboard(scored, EXAMPLES)
    assert board == {"b-video": [5, 6, 9], "open-images-a": [1, 8]}
    assert list(board) == ["b-video", "open-images-a"]
    assert json.loads(json.dumps(board)) == board  # plain JSON: set name -> list of ints


def test_accuracy_overall_video_and_static():
    scored = {
        "prediction": np.array([1, 2, 3, 4, 5, 6]),
        "target": np.array([1, 0, 3, 4, 0, -1]),  # the last one has no label
        "is_video": np.array([True, True, True, False, False, True]),
    }
    assert accuracy(scored) == {"acc": 0.6, "acc_video": pytest.approx(2 / 3), "acc_static": 0.5, "descriptions": 5}


def test_accuracy_by_group_counts_labelled_descriptions_of_each_groups_sets():
    scored = {
        "example_id": np.array([2, 0, 4, 1, 3]),
        "prediction": np.array([1, 5, 3, 6, 7]),
        "target": np.array([1, 0, -1, 6, 7]),  # example 4 has no label
    }
    group = {"b-video": "motion", "open-images-a": "detail"}
    assert accuracy_by(scored, EXAMPLES, group) == {"detail": 1.0, "motion": pytest.approx(2 / 3)}


def test_score_split_drops_padding_and_keeps_rows_aligned():
    mesh = parallel.make_mesh((-1, 1, 1))
    batches = [
        {"example_id": np.array([0, 1]), "target": np.array([2, 0]), "is_video": np.array([True, False]),
         "scores": np.array([[0.0, 0.0, 1.0], [0.0, 3.0, 0.0]])},
        {"example_id": np.array([2, -1]), "target": np.array([1, 0]), "is_video": np.array([False, False]),
         "scores": np.array([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])},
    ]  # fmt: skip
    scored = score_split(lambda batch: batch["scores"], batches, parallel.batch_sharding(mesh))
    np.testing.assert_array_equal(scored["example_id"], [0, 1, 2])
    np.testing.assert_array_equal(scored["prediction"], [2, 1, 1])
    np.testing.assert_array_equal(scored["target"], [2, 0, 1])
    assert scored["is_video"].tolist() == [True, False, False]
