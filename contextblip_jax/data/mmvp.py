"""MMVP-VLM (Tong et al., 2024), the paper's second benchmark: pairs of statements about pairs of images.

Layout: `<root>/Questions.csv` with a header and rows `question id, category, statement`, and the images at
`<root>/MLLM_VLM Images/<category>/<question id>.jpg`. Rows come in pairs (ids 2k-1, 2k) of one category;
statement i describes image i. 9 categories x 15 pairs. A pair counts as correct only when each statement
scores its own image above the other one; statements are prefixed "a photo of " as in the official script.
`read_pairs(..., pre_caption_words=N)` cleans the prefixed statements with `pre_caption` like every other text
of a run with `data.pre_caption_words` N (the authors' BLIP baseline script cleans MMVP statements; their
ContextBLIP one does not).

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from contextblip_jax.data.errors import DataError
from contextblip_jax.data.text_cleaning import clean

QUESTIONS_FILE = "Questions.csv"
IMAGE_DIR = "MLLM_VLM Images"
PROMPT = "a photo of "


@dataclasses.dataclass(frozen=True)
class MmvpPair:
    category: str
    question_ids: tuple[int, int]
    statements: tuple[str, str]
    image_paths: tuple[str, str]
    pre_caption_words: int = 0

    @property
    def texts(self) -> tuple[str, str]:
        """The two texts as the tokenizer gets them: prefixed, then cleaned when `pre_caption_words` > 0."""
        first, second = (clean(PROMPT + statement, self.pre_caption_words) for statement in self.statements)
        return first, second


def _row(row: Sequence[str], line: int, path: str) -> tuple[int, str, str]:
    if len(row) < 3:
        raise DataError(path, f"line {line}: expected question id, category, statement; got {row!r}")
    qid, category, statement = (cell.strip() for cell in row[:3])
    if not qid.isdigit():
        raise DataError(path, f"line {line}: question id {qid!r} is not a positive integer")
    if not category or not statement:
        raise DataError(path, f"line {line}: empty category or statement")
    return int(qid), category, statement


def read_pairs(root: str, check_images: bool = True, pre_caption_words: int = 0) -> list[MmvpPair]:
    """All statement pairs in file order; errors name the CSV line or the missing image. `pre_caption_words`:
    the run's `data.pre_caption_words`, for the pairs' `texts`."""
    path = os.path.join(root, QUESTIONS_FILE)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    body = [_row(r, line, path) for line, r in enumerate(rows[1:], start=2)]
    if len(body) % 2:
        raise DataError(path, f"{len(body)} statements: rows must come in pairs")
    pairs = []
    for k in range(0, len(body), 2):
        (id1, cat1, s1), (id2, cat2, s2) = body[k], body[k + 1]
        if id1 % 2 != 1 or id2 != id1 + 1 or cat1 != cat2:
            raise DataError(path, f"lines {k + 2}-{k + 3}: ids {id1},{id2} ({cat1}/{cat2}) are not a pair 2k-1, 2k")
        images = tuple(os.path.join(root, IMAGE_DIR, cat1, f"{qid}.jpg") for qid in (id1, id2))
        for image in images if check_images else ():
            if not os.path.isfile(image):
                raise DataError(image, "image not found", f"{cat1} pair {id1},{id2}")
        pairs.append(MmvpPair(cat1, (id1, id2), (s1, s2), images, pre_caption_words))
    return pairs


def pair_correct(scores: np.ndarray) -> bool:
    """`scores[i, j]`: statement i against image j. Correct iff each statement prefers its own image."""
    scores = np.asarray(scores)
    if scores.shape != (2, 2):
        raise ValueError(f"scores must be [2 statements, 2 images], got shape {scores.shape}")
    return bool(scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0])


def accuracy(pairs: Sequence[MmvpPair], scores: Mapping[int, np.ndarray] | Sequence[np.ndarray]) -> dict[str, float]:
    """Pair accuracy per category and overall (`"all"`), as fractions; `scores[i]` belongs to `pairs[i]`."""
    correct: dict[str, list[bool]] = collections.defaultdict(list)
    for i, pair in enumerate(pairs):
        ok = pair_correct(scores[i])
        correct[pair.category].append(ok)
        correct["all"].append(ok)
    return {category: float(np.mean(values)) for category, values in correct.items()}
