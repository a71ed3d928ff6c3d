"""The authors' caption cleaning, `pre_caption(text, max_words)`, applied before tokenisation.

ContextBLIP's fine-tuning and evaluation scripts clean every description with `utils.pre_caption` (ALBEF's rules,
30 words) before BERT sees it, so a model trained on cleaned text should be fed cleaned text. The rules, in order:
lower-case; delete `,.'!?"()*#:;~`; `-` and `/` become spaces; every run of two or more whitespace characters
becomes one space (a single tab or newline stays); trailing newlines, then leading and trailing spaces, go; the
first `max_words` space-separated words are kept. Text made only of removed characters becomes "".

Their stage-1 reader uses BLIP's `data/utils.pre_caption` instead, which differs: it replaces `.!"()*#:;~` with
spaces and keeps `,'?-/`. `rules` picks one: "albef" (fine-tuning, evaluation) or "blip" (stage 1), the run-config
key `data.pre_caption_rules`.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import re

RULES = ("albef", "blip")
_REMOVED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED_BLIP = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_SPACED = str.maketrans({"-": " ", "/": " "})


def pre_caption(text: str, max_words: int, rules: str = "albef") -> str:
    """`text` cleaned by `rules` (see the module docstring) and cut to its first `max_words` words."""
    if max_words < 1:
        raise ValueError(f"max_words must be positive, got {max_words}")
    if rules not in RULES:
        raise ValueError(f"pre_caption rules must be one of {RULES}, got {rules!r}")
    lowered = text.lower()
    text = _SPACED_BLIP.sub(" ", lowered) if rules == "blip" else _REMOVED.sub("", lowered).translate(_SPACED)
    text = _WHITESPACE_RUN.sub(" ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def clean(text: str, pre_caption_words: int, rules: str = "albef") -> str:
    """`text` as every reader feeds it to the tokenizer: `data.pre_caption_words` 0 leaves it as given."""
    return pre_caption(text, pre_caption_words, rules) if pre_caption_words else text
