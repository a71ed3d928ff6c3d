"""BLIP's tokenizer built offline, and image normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from contextblip_jax.data import preprocess
from contextblip_jax.data.errors import DataError
from contextblip_jax.data.preprocess import BlipTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> BlipTokenizer:
    return BlipTokenizer()


def vocab_ids(words: list[str]) -> list[int]:
    """Ids read straight from vocab.txt: a token's id is its line number."""
    with open(preprocess.default_vocab_path()) as f:
        lines = [line.rstrip("\n") for line in f]
    return [lines.index(word) for word in words]


def test_shipped_vocab_is_bert_base_uncased():
    import hashlib

    with open(preprocess.default_vocab_path(), "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == "64800d5d8528ce344256daf115d4965e"


def test_real_words_get_their_real_ids(tokenizer):
    words = ["the", "dog", "woman", "beach", "left", "right"]
    ids, mask = tokenizer([" ".join(words)], max_length=10, first_token="cls")
    assert ids[0, 1:7].tolist() == vocab_ids(words) == [1996, 3899, 2450, 3509, 2187, 2157]
    assert ids[0, 0] == 101 and ids[0, 7] == 102 and mask[0].tolist() == [1] * 8 + [0] * 2


def test_lower_cases_and_splits_wordpieces(tokenizer):
    upper, _ = tokenizer(["The DOG"], 5, "cls")
    lower, _ = tokenizer(["the dog"], 5, "cls")
    np.testing.assert_array_equal(upper, lower)
    ids, _ = tokenizer(["unaffable"], 8, "cls")
    assert 100 not in ids[0]  # no [UNK]: split into word pieces instead


def test_special_tokens_and_first_token(tokenizer):
    assert tokenizer.vocab_size == 30524
    enc, _ = tokenizer(["a dog"], 6, "enc")
    cls, _ = tokenizer(["a dog"], 6, "cls")
    assert enc[0, 0] == preprocess.ENC_ID == 30523 and cls[0, 0] == 101
    np.testing.assert_array_equal(enc[0, 1:], cls[0, 1:])
    with pytest.raises(ValueError, match="first_token"):
        tokenizer(["a dog"], 6, "dec")


def test_builds_from_a_vocab_file_and_from_a_folder(tmp_path, tokenizer):
    import shutil

    shutil.copy(preprocess.default_vocab_path(), tmp_path / "vocab.txt")
    for source in (str(tmp_path / "vocab.txt"), str(tmp_path)):
        ids, _ = BlipTokenizer(source)(["the dog"], 4, "enc")
        assert ids[0].tolist() == [30523, 1996, 3899, 102]
    with pytest.raises(FileNotFoundError, match="neither"):
        BlipTokenizer(str(tmp_path / "missing.txt"))


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(max_size=80), min_size=1, max_size=4), length=st.integers(2, 40))
def test_any_text_gives_fixed_shapes_and_prefix_masks(tokenizer, texts, length):
    ids, mask = tokenizer(texts, length, "enc")
    assert ids.shape == mask.shape == (len(texts), length)
    assert ids.dtype == mask.dtype == np.int32
    assert (ids[:, 0] == preprocess.ENC_ID).all()
    for row in mask:
        real = int(row.sum())
        assert row[:real].all() and not row[real:].any() and real >= 2  # first token + [SEP] at least
    assert (ids[mask == 0] == 0).all()


def test_normalize_image_resizes_and_uses_clip_statistics():
    white = Image.new("RGB", (50, 30), (255, 255, 255))
    out = preprocess.normalize_image(white, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    expected = [(1 - 0.48145466) / 0.26862954, (1 - 0.4578275) / 0.26130258, (1 - 0.40821073) / 0.27577711]
    np.testing.assert_allclose(out[5, 7], expected, rtol=1e-6)
    grey = preprocess.normalize_image(Image.new("L", (8, 8), 0), 4)
    np.testing.assert_allclose(
        grey[0, 0], [-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711], rtol=1e-6
    )


def bomb_jpeg(width: int, height: int) -> bytes:
    """A valid 8x8 JPEG whose frame header is rewritten to declare width x height (a few hundred bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # baseline frame: marker, length, precision, height, width
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    bomb = bomb_jpeg(9000, 9000)  # 81M pixels: under PIL's own limits (89M warns, 179M refuses), over ours
    assert len(bomb) < 1000
    with pytest.raises(DataError, match=r"bomb\.jpg \[set s\]: declares 9000x9000 = 81,000,000 pixels"):
        preprocess.decode_jpeg(bomb, "bomb.jpg", "s")
    with pytest.raises(DataError, match=r"bomb\.jpg"):  # PIL's own check, before ours, is as early
        preprocess.decode_jpeg(bomb_jpeg(60000, 60000), "bomb.jpg", "s")
    path = tmp_path / "bomb.jpg"
    path.write_bytes(bomb)
    with pytest.raises(DataError, match="over the limit"):
        preprocess.load_image(str(path), 16)
    assert decoded == []
    fine = bomb_jpeg(8, 8)  # the same file with its true size decodes
    assert preprocess.decode_jpeg(fine, "fine.jpg").size == (8, 8) and set(decoded) == {(8, 8)}
