"""The report: ranks and the shown descriptions, and the folder it writes (in-process, on a tiny random model)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import nnx

from contextblip_jax.data import imagecode
from contextblip_jax.data.pipeline import DataConfig
from contextblip_jax.evaluation.report import candidate_ranks, choose, target_ranks, write_report
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.variants import variant


def test_target_ranks_count_the_candidates_scored_higher():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1]])
    assert target_ranks(scores, np.array([2, 0])).tolist() == [2, 1]
    assert candidate_ranks([0.1, 0.9, 0.5]) == [3, 1, 2]


def test_the_hardest_come_first_then_a_sample_of_correct_ones():
    ranks = np.array([1, 7, 3, 1, 7, 1])
    margins = np.array([0.0, 0.2, 0.5, 0.0, 0.9, 0.0])
    chosen = choose(ranks, margins, hardest=2, correct=2)
    assert chosen[:2] == [("hardest", 4), ("hardest", 1)]
    assert [reason for reason, _ in chosen[2:]] == ["correct", "correct"]
    assert {i for _, i in chosen[2:]} <= {0, 3, 5}
    assert choose(ranks, margins, hardest=9, correct=0) == [("hardest", 4), ("hardest", 1), ("hardest", 2)]


def test_the_folder_holds_a_page_whose_cards_show_every_candidate(tmp_path, generated_root):
    examples = imagecode.read_split(generated_root, "valid")
    rng = np.random.default_rng(0)
    scored = {
        "output": rng.normal(size=(len(examples), 10)),
        "example_id": np.arange(len(examples)),
        "target": np.array([e.target for e in examples]),
        "is_video": np.array([e.is_video for e in examples]),
    }
    model = ContextBLIP(variant("tiny"), rngs=nnx.Rngs(0))
    data = DataConfig(root=generated_root, image_size=32, max_text_length=24)
    out = str(tmp_path / "report")
    summary = write_report(out, scored, examples, model, "finetune", data, hardest=3, correct=2)
    shown = summary["cards"]
    assert 2 <= shown <= 5 and summary["descriptions"] == len(examples)
    with open(os.path.join(out, "index.html"), encoding="utf-8") as f:
        page = f.read()
    assert len(re.findall(r'<section class="card', page)) == shown
    assert len(re.findall(r'<figure class="candidate', page)) == 10 * shown
    assert page.count('class="candidate target') == shown
    for source in re.findall(r'src="([^"]+)"', page):
        assert os.path.getsize(os.path.join(out, source)) > 0
    assert not re.search(r"(https?:)?//", page)  # nothing from the network
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["cards"] == shown
