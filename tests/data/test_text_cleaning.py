"""`pre_caption`: each of the authors' rules with hand-written expectations, its invariants, and the grain
pipeline, which applies it to descriptions and captions only when `data.pre_caption_words` > 0."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contextblip_jax.data import pipeline
from contextblip_jax.data.preprocess import BlipTokenizer
from contextblip_jax.data.text_cleaning import clean, pre_caption
from tests.data.helpers import make_folder, write_jpeg

REMOVED = ",.'!?\"()*#:;~"


@pytest.mark.parametrize("char", list(REMOVED))
def test_punctuation_is_deleted_not_spaced(char):
    assert pre_caption(f"the{char}dog {char}runs{char}", 30) == "thedog runs"


def test_a_sentence_loses_its_punctuation():
    assert pre_caption("It's \"the\" dog (left), isn't it? Yes: #1; ~ok*!", 30) == "its the dog left isnt it yes 1 ok"


def test_hyphen_and_slash_become_spaces():
    assert pre_caption("black-and-white photo/image", 30) == "black and white photo image"
    assert pre_caption("a - b / c", 30) == "a b c"


def test_upper_case_is_lowered():
    assert pre_caption("The Man ON the LEFT", 30) == "the man on the left"


def test_whitespace_runs_collapse_but_a_single_tab_stays():
    assert pre_caption("a  b\t\tc \n d   e", 30) == "a b c d e"
    assert pre_caption("a\tb", 30) == "a\tb"


def test_words_are_cut_at_max_words():
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_caption("one   two, three", 2) == "one two"  # counted after collapsing and removal
    assert pre_caption("one two three four", 4) == "one two three four"


def test_trailing_newlines_and_outer_spaces_go_a_leading_newline_stays():
    assert pre_caption("a dog.\n", 30) == "a dog"
    assert pre_caption("  a dog \n", 30) == "a dog"
    assert pre_caption("\na dog", 30) == "\na dog"
    assert pre_caption("a\nb", 30) == "a\nb"


def test_text_of_removed_characters_only_becomes_empty():
    assert pre_caption("...!?", 30) == ""
    assert pre_caption("", 30) == ""
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("a dog", 0)


def test_zero_words_means_the_text_as_given():
    assert clean("A dog's nose.", 0) == "A dog's nose."
    assert clean("A dog's nose.", 30) == "a dogs nose"


_TEXTS = st.text(st.sampled_from(list("aZé İ\t\n\r\x0b\xa0\u2003-/" + REMOVED)) | st.characters(), max_size=60)


@given(_TEXTS, st.integers(1, 8))
def test_cleaned_text_invariants(text, max_words):
    out = pre_caption(text, max_words)
    assert pre_caption(out, max_words) == out  # idempotent: cleaning cleaned text changes nothing
    assert not set(out) & set(REMOVED + "-/")
    assert out == out.lower()
    assert len(out.split(" ")) <= max_words
    assert out == out.strip(" ") and "  " not in out and not out.endswith("\n")


TEXT = "A Dog's NOSE (again), black-and-white!"


def _tokens(text: str) -> list[int]:
    return BlipTokenizer()([text], 16, "enc")[0][0].tolist()


@pytest.mark.parametrize("words", [0, 30])
@pytest.mark.parametrize("train", [True, False])
def test_pipeline_tokenises_cleaned_descriptions_and_captions(tmp_path, words, train):
    root = make_folder(str(tmp_path / "imagecode"), {"MSR-VTT-clip": range(10)}, {"MSR-VTT-clip": {"3": TEXT}})
    write_jpeg(str(tmp_path / "captioned.jpg"), (10, 200, 10))
    with open(tmp_path / "ann.json", "w") as f:
        json.dump([{"image": "captioned.jpg", "caption": TEXT}], f)
    settings = {"image_size": 8, "max_text_length": 16, "batch_size": 1, "pre_caption_words": words}
    descriptions = pipeline.imagecode_dataset(pipeline.DataConfig(root=root, **settings), "train", train=train)
    caption_config = pipeline.DataConfig(root=str(tmp_path), annotations=(str(tmp_path / "ann.json"),), **settings)
    caption = next(iter(pipeline.captions_dataset(caption_config, train=train)))["input_ids"][0].tolist()
    description = next(iter(descriptions))["input_ids"][0].tolist()
    cleaned, raw = _tokens("a dogs nose again black and white"), _tokens(TEXT)
    assert cleaned != raw
    assert description == caption == (cleaned if words else raw)


def test_negative_words_are_refused():
    with pytest.raises(ValueError, match="pre_caption_words"):
        pipeline.DataConfig(pre_caption_words=-1)


def test_stage_one_rules_space_out_fewer_characters_and_keep_the_rest():
    """BLIP's `data/utils.pre_caption` (the authors' stage 1): `.!"()*#:;~` become spaces, `,'?-/` stay."""
    text = "A man's dog-house, left/right! (Big)  Yes?"
    assert pre_caption(text, 30, "blip") == "a man's dog-house, left/right big yes?"
    assert pre_caption("one.two!three", 2, "blip") == "one two"


def test_the_pipeline_cleans_with_the_rules_it_is_given(tmp_path):
    write_jpeg(str(tmp_path / "captioned.jpg"), (10, 200, 10))
    with open(tmp_path / "ann.json", "w") as f:
        json.dump([{"image": "captioned.jpg", "caption": "left/right, it's red."}], f)
    tokens = {}
    for rules in ("albef", "blip"):
        config = pipeline.DataConfig(
            root=str(tmp_path),
            annotations=(str(tmp_path / "ann.json"),),
            image_size=8,
            max_text_length=16,
            batch_size=1,
            pre_caption_words=30,
            pre_caption_rules=rules,
        )
        tokens[rules] = next(iter(pipeline.captions_dataset(config, train=False)))["input_ids"][0].tolist()
    assert tokens == {"albef": _tokens("left right its red"), "blip": _tokens("left/right, it's red")}
    with pytest.raises(ValueError, match="pre_caption_rules"):
        pipeline.DataConfig(pre_caption_rules="bert")
