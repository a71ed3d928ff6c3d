"""Whole-pass benchmarks (`benchmark/passes.py`) read the split's first N sets, run them as the evaluator and the
trainer do, and count the work each framework did; PyTorch's scores are checked description by description."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from contextblip_jax.benchmark import passes
from contextblip_jax.benchmark.jax_steps import Setup
from contextblip_jax.data import imagecode, synthetic


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> str:
    """Sets with 1, 2 and 3 descriptions in ImageCoDe's shares, 32 px (the tiny preset's size)."""
    root = str(tmp_path_factory.mktemp("mixed"))
    synthetic.generate(
        root, seed=5, num_train_sets=8, num_valid_sets=8, num_test_sets=1, image_size=32, descriptions_mix="imagecode"
    )
    return root


def read_split(root: str, split: str) -> dict:
    with open(imagecode.split_path(root, split)) as f:
        return json.load(f)


def test_subset_keeps_the_first_sets_of_the_split_as_train_and_valid(mixed_root, tmp_path):
    sets, descriptions = passes.subset_root(mixed_root, "train", 5, str(tmp_path))
    first = dict(list(read_split(mixed_root, "train").items())[:5])
    assert sets == 5 and descriptions == sum(len(d) for d in first.values())
    assert read_split(str(tmp_path), "train") == first == read_split(str(tmp_path), "valid")
    assert read_split(str(tmp_path), "test") == {name: list(d.values()) for name, d in first.items()}
    name = next(iter(first))
    linked, real = imagecode.list_set_images(str(tmp_path), name), imagecode.list_set_images(mixed_root, name)
    assert [os.path.realpath(path) for path in linked] == [os.path.realpath(path) for path in real]


def test_agreement_stops_on_a_differing_score_or_a_missing_description():
    scores = {0: np.array([0.1, 0.9]), 3: np.array([0.5, 0.5])}
    close = {0: np.array([0.1, 0.9 + 5e-5]), 3: np.array([0.5, 0.5])}
    assert passes.check_agreement(scores, close, "float32") == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(SystemExit, match="differ"):
        passes.check_agreement(scores, {0: np.array([0.1, 0.8]), 3: scores[3]}, "float32")
    assert passes.check_agreement(scores, {0: np.array([0.1, 0.8]), 3: scores[3]}, "bfloat16") > 0.09
    with pytest.raises(SystemExit, match="different descriptions"):
        passes.check_agreement(scores, {0: scores[0]}, "float32")


def test_compare_names_what_each_stage_can_be_compared_with():
    passes.check_compare(Setup("tiny", "zeroshot", train=False), ("torch",))
    passes.check_compare(Setup("tiny", "context", train=True), ("uncached",))
    with pytest.raises(ValueError, match="ported"):
        passes.check_compare(Setup("tiny", "context", train=False), ("torch",))
    with pytest.raises(ValueError, match="uncached"):
        passes.check_compare(Setup("tiny", "finetune", train=True), ("uncached",))
    with pytest.raises(ValueError, match="compares with"):
        passes.check_compare(Setup("tiny", "finetune", train=True), ("torch_compile",))


def pass_setup(root: str, stage: str, train: bool, descriptions: int, **kwargs) -> passes.PassSetup:
    step = Setup("tiny", stage, train=train, descriptions=descriptions)
    return passes.PassSetup(step=step, root=root, **kwargs)


@pytest.mark.long
def test_zero_shot_pass_encodes_each_set_once_and_scores_as_pytorch_does(mixed_root):
    split = read_split(mixed_root, "valid")
    count = sum(len(d) for d in split.values())
    jax_row, torch_row = passes.pass_rows(
        pass_setup(mixed_root, "zeroshot", False, 6, split="valid", limit_sets=8), ("torch",), runs=1
    )
    assert jax_row["descriptions"] == torch_row["descriptions"] == count and jax_row["sets"] == 8
    assert jax_row["images_encoded_per_description"] == pytest.approx(10 * 8 / count, abs=1e-4)
    assert torch_row["images_encoded_per_description"] == 10
    assert torch_row["max_score_difference_vs_jax"] <= passes.AGREEMENT
    assert jax_row["group_by_set"] and not torch_row["group_by_set"]
    assert jax_row["flops_per_description"] < torch_row["flops_per_description"]
    assert jax_row["ratio_vs_torch"] == pytest.approx(
        jax_row["descriptions_per_s"] / torch_row["descriptions_per_s"], rel=1e-2
    )


def test_ungrouped_pass_encodes_each_description_s_images(mixed_root):
    (row,) = passes.pass_rows(pass_setup(mixed_root, "zeroshot", False, 6, group_by_set=False), runs=1)
    assert row["images_encoded_per_description"] == 10 and not row["group_by_set"]
    padded = row["batches"] * 6 / row["descriptions"]  # the last batch's padding slots are computed too
    assert row["flops_per_description"] == pytest.approx(row["flops_per_description_ungrouped"] * padded, rel=1e-6)


@pytest.mark.long
def test_stage_2a_epoch_counts_every_description_once_grouped(mixed_root):
    split = read_split(mixed_root, "train")
    jax_row, torch_row = passes.pass_rows(
        pass_setup(mixed_root, "finetune", True, 4, split="train", limit_sets=8), ("torch",), runs=1
    )
    assert jax_row["descriptions"] == sum(len(d) for d in split.values())  # one epoch, padding not counted
    assert torch_row["descriptions"] == torch_row["steps"] * 4 <= jax_row["descriptions"]
    assert jax_row["set_slots"] == 2 and jax_row["group_by_set"] and torch_row["images_encoded_per_description"] == 10
    assert 10 * 8 / jax_row["descriptions"] <= jax_row["images_encoded_per_description"] < 10  # a set may be split
    assert jax_row["flops_per_description"] < torch_row["flops_per_description"]


@pytest.mark.long
def test_stage_2b_epoch_on_cached_features_reports_the_cache_build(mixed_root):
    cached, uncached = passes.pass_rows(
        pass_setup(mixed_root, "context", True, 4, split="train", limit_sets=8), ("uncached",), runs=1
    )
    assert cached["cache_features"] and not uncached["cache_features"]
    assert cached["cache_build_s"] > 0 and "cache_build_s" not in uncached
    assert cached["images_encoded_per_description"] == 0 and uncached["images_encoded_per_description"] < 10
    assert cached["flops_per_description"] < 0.2 * uncached["flops_per_description"]
