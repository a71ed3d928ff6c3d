"""The pages' tables are what their data files give (`python -m contextblip_jax.doctables`): the committed pages
equal the generator's output, and a table edited by hand is found stale."""

from __future__ import annotations

import os
import shutil

import pytest

from contextblip_jax import doctables


def test_every_committed_table_is_what_its_data_gives():
    assert doctables.stale() == []


def test_every_table_name_has_a_placeholder_on_some_page():
    text = ""
    for page in doctables.pages():
        with open(page) as f:
            text += f.read()
    missing = [name for name in doctables.TABLES if f"<!-- table:{name} -->" not in text]
    assert missing == []


@pytest.fixture()
def checkout_copy(tmp_path) -> str:
    """README.md, docs/*.md and the data files, as a root the generator can work on."""
    root = str(tmp_path)
    shutil.copy(os.path.join(doctables.ROOT, "README.md"), root)
    shutil.copytree(os.path.join(doctables.ROOT, "docs"), os.path.join(root, "docs"))
    return root


def test_a_table_edited_by_hand_is_stale_and_rewriting_restores_it(checkout_copy, monkeypatch):
    monkeypatch.setattr(doctables, "ROOT", checkout_copy)
    page = os.path.join(checkout_copy, "docs", "benchmarks.md")
    with open(page) as f:
        committed = f.read()
    start = committed.index("<!-- table:benchmarks_cpu_train -->")
    row = committed.index("| jax |", start)
    edited = committed[:row] + "| jax | 1.000 s (1.000–1.000)" + committed[committed.index(" |", row + 40) :]
    with open(page, "w") as f:
        f.write(edited)
    assert doctables.stale(checkout_copy) == ["docs/benchmarks.md"]
    assert doctables.write(checkout_copy) == ["docs/benchmarks.md"]
    with open(page) as f:
        assert f.read() == committed


def test_an_unknown_table_name_is_an_error_naming_the_page():
    with pytest.raises(ValueError, match=r"page\.md: table 'nowhere' has no data file"):
        doctables.render("<!-- table:nowhere -->\n<!-- /table:nowhere -->", "page.md")


def test_ablation_claims_compare_each_seeds_cells_with_and_without_the_part():
    def row(cell: str, seed: int, acc: float, detail: float) -> dict:
        by_kind = {"detail": detail, "recolour": 0.5}
        return {"cell": cell, "seed": seed, "acc": acc, "acc_video": 0.5, "acc_static": 0.5, "acc_by_kind": by_kind}

    others = ("2a → 2b", "1 → 2a → 2b", "1 → 2a", "1 no TMIM → 2a", "2a → 2b, 4× the steps (follow-up)")
    rows = [row(cell, seed, 0.5, 0.5) for cell in others for seed in (0, 1)]
    rows += [row("2a", 0, 0.6, 0.4), row("2a", 1, 0.7, 0.9), row("2a, no adapter", 0, 0.5, 0.5)]
    rows += [row("2a, no adapter", 1, 0.75, 0.6)]
    table = doctables._ablation_claims(rows).splitlines()
    adapter_on_detail = next(line for line in table if "| 2a | 2a, no adapter | detail |" in line)
    assert adapter_on_detail.endswith("| -0.100 / +0.300 | +0.100 | 1 of 2 |")
    adapter_overall = next(line for line in table if "| 2a | 2a, no adapter | overall |" in line)
    assert adapter_overall.endswith("| +0.100 / -0.050 | +0.025 | 1 of 2 |")
