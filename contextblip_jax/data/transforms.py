"""Per-example transforms the grain pipeline runs in its workers: decode, augment, normalise, tokenise.

Input elements are the sources' records (JPEG bytes + metadata, see `imagecode.example_record` and
`captions.caption_record`); outputs hold numbers only, so grain can stack them into batches:

    ImageCoDe: images [10, S, S, 3] float32, input_ids / attention_mask [L] int32 (first token [ENC] by default),
               target int32 (-1: no label), is_video bool, example_id int32 (-1: padding)
    captions:  images [S, S, 3] float32, input_ids / attention_mask [L] int32, example_id int32
    training adds skipped int32: the damaged examples this one replaced (0 unless on_error="skip")

The element `{"example_id": -1}` is padding (evaluation pads the last global batch); it becomes zeros. With
`on_error="skip"` an example whose image fails to decode is replaced in training by the next decodable example
of the source (batches are fixed sets of positions, see pipeline.py) and turned into padding in evaluation, so
every host still yields the same number of full batches; each skip is logged and counted. An image deleted or
damaged while a run is in progress is met here too: sources hand read errors on as `errors.unreadable_record`.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
from absl import logging

from contextblip_jax.data import augment, imagecode
from contextblip_jax.data.errors import SKIPPED_FIELD, DataError, check_on_error, check_readable
from contextblip_jax.data.preprocess import BlipTokenizer, decode_jpeg, normalize_image, to_normalized_array
from contextblip_jax.data.text_cleaning import clean

PADDING = {"example_id": -1}


_MAX_REPLACEMENTS = 100
_IMPORT_LOCK = threading.Lock()  # transformers' lazy imports race when two threads build tokenizers at once


@dataclasses.dataclass
class Prepare:
    """Shared settings, the skip-or-raise logic and the lazily built tokenizer (one per process, never pickled).

    grain calls the transform from several threads; the Rust tokenizer's padding state is not safe to share
    between concurrent calls (nor are transformers' lazy imports, even across instances), so locks guard it:
    tokenising one description takes about 50 µs, next to milliseconds of JPEG decoding. `source` (set by the
    pipeline) is where replacements for skipped training examples come from.
    """

    image_size: int
    max_text_length: int
    first_token: str = "enc"
    augment: augment.AugmentConfig = dataclasses.field(default_factory=augment.AugmentConfig)
    train: bool = False
    on_error: str = "raise"
    jpeg_draft: bool = False
    vocab: str | None = None
    pre_caption_words: int = 0
    pre_caption_rules: str = "albef"
    source: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_on_error(self.on_error)
        self._tokenizer: BlipTokenizer | None = None
        self._lock = threading.Lock()
        self._skipped = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_tokenizer", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _tokenizer=None, _lock=threading.Lock())

    def __call__(self, element: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Model inputs of `element` (`map` in evaluation, `random_map` in training); see the module docstring.

        Training outputs also carry `skipped`: how many damaged examples this one stands in for (the trainer
        counts them in metrics.jsonl and in its checkpoints, and drops the field before the step)."""
        for failed in range(_MAX_REPLACEMENTS):
            example_id = int(element["example_id"])
            if example_id < 0:
                return self._counted(self.padding(), failed)
            try:
                return self._counted(self.prepare(check_readable(element), example_id, rng), failed)
            except DataError as error:
                if self.on_error == "raise":
                    raise
                with self._lock:
                    self._skipped += 1
                replace = self.train and self.source is not None
                instead = f"example {(example_id + 1) % len(self.source)}" if replace else "padding"
                logging.warning(
                    "skipped example %d (%d in this process so far), %s instead: %s",
                    example_id,
                    self._skipped,
                    instead,
                    error,
                )
                if not replace:
                    return self._counted(self.padding(), failed + 1)
                element = self.source[(example_id + 1) % len(self.source)]
        raise DataError(str(self.source), f"{_MAX_REPLACEMENTS} consecutive examples failed to decode")

    def _counted(self, out: dict[str, Any], skipped: int) -> dict[str, Any]:
        if self.train:
            out[SKIPPED_FIELD] = np.int32(skipped)
        return out

    def prepare(self, element: dict[str, Any], example_id: int, rng: np.random.Generator | None) -> dict[str, Any]:
        raise NotImplementedError

    def padding(self) -> dict[str, Any]:
        raise NotImplementedError

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask of `text`, cleaned first by `pre_caption` when `pre_caption_words` > 0 (the one
        place every description and caption passes, after any flip: the authors clean just before the model)."""
        text = clean(text, self.pre_caption_words, self.pre_caption_rules)
        with self._lock:
            if self._tokenizer is None:
                with _IMPORT_LOCK:
                    self._tokenizer = BlipTokenizer(self.vocab)
            ids, mask = self._tokenizer([text], self.max_text_length, self.first_token)
        return ids[0], mask[0]

    def images(self, blobs, names, where: str, rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
        """Decoded, (augmented,) resized and normalised [n, S, S, 3]; also whether the text must follow a flip
        (flip="text_aware", whose one draw is shared by all the images; a "plain" flip leaves the text alone)."""
        draft = self.image_size if self.jpeg_draft else None
        decoded = [decode_jpeg(blob, name, where, draft) for blob, name in zip(blobs, names, strict=True)]
        if not (self.train and self.augment.enabled and rng is not None):
            return np.stack([normalize_image(image, self.image_size) for image in decoded]), False
        draws = augment.sample_all(rng, self.augment, [image.size for image in decoded])
        out = [augment.apply(image, draw, self.image_size) for image, draw in zip(decoded, draws, strict=True)]
        mirror_text = self.augment.flip == "text_aware" and draws[0].flip
        return np.stack([to_normalized_array(image) for image in out]), mirror_text


class PrepareImageCode(Prepare):
    """ImageCoDe record → 10 normalised images, the tokenised description (left/right swapped by a text-aware flip)."""

    def prepare(self, element: dict[str, Any], example_id: int, rng: np.random.Generator | None) -> dict[str, Any]:
        images, mirror_text = self.set_images(element, rng)
        text = augment.flip_text(element["description"]) if mirror_text else element["description"]
        return {"images": images, **self.description(text, element["target"], element["is_video"], example_id)}

    def set_images(self, element: dict[str, Any], rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
        """The record's 10 images [10, S, S, 3] under one draw, and whether its texts must follow a flip."""
        set_name = element["set_name"]
        names = [f"{imagecode.IMAGE_DIR}/{set_name}/{name}" for name in element["image_names"]]
        return self.images(element["images"], names, set_name, rng)

    def description(self, text: str, target: int, is_video: bool, example_id: int) -> dict[str, Any]:
        """A description's fields without its images (grouped batches give a set's images once, `grouped.py`)."""
        input_ids, attention_mask = self.tokenize(text)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target": np.int32(target),
            "is_video": np.bool_(is_video),
            "example_id": np.int32(example_id),
        }

    def padding(self) -> dict[str, Any]:
        s, n, length = self.image_size, imagecode.NUM_CANDIDATES, self.max_text_length
        return {
            "images": np.zeros((n, s, s, 3), np.float32),
            "input_ids": np.zeros(length, np.int32),
            "attention_mask": np.zeros(length, np.int32),
            "target": np.int32(imagecode.NO_TARGET),
            "is_video": np.bool_(False),
            "example_id": np.int32(-1),
        }


class PrepareCaption(Prepare):
    """Caption record → one normalised image and one of its captions (training draws it, evaluation: the first)."""

    def prepare(self, element: dict[str, Any], example_id: int, rng: np.random.Generator | None) -> dict[str, Any]:
        name = element["image_name"]
        images, mirror_text = self.images([element["image"]], [name], name, rng)
        captions = element["captions"]
        caption = captions[int(rng.integers(len(captions)))] if self.train and rng is not None else captions[0]
        input_ids, attention_mask = self.tokenize(augment.flip_text(caption) if mirror_text else caption)
        return {
            "images": images[0],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "example_id": np.int32(example_id),
        }

    def padding(self) -> dict[str, Any]:
        s, length = self.image_size, self.max_text_length
        return {
            "images": np.zeros((s, s, 3), np.float32),
            "input_ids": np.zeros(length, np.int32),
            "attention_mask": np.zeros(length, np.int32),
            "example_id": np.int32(-1),
        }
