"""Hypothesis feeds the JSON readers random and mutated records: they parse or raise DataError, never crash."""

from __future__ import annotations

import copy
import json
import os
import tempfile

from hypothesis import example, given, settings
from hypothesis import strategies as st

from contextblip_jax.data import captions, imagecode
from contextblip_jax.data.errors import DataError, ErrorPolicy

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
descriptions = st.text(min_size=1, max_size=30).filter(str.strip)


def inside_root(image: str) -> bool:
    """A relative path without `..` or NUL: what the caption reader accepts as an image under its root."""
    return not os.path.isabs(image) and ".." not in image.replace("\\", "/").split("/") and "\0" not in image


set_names = st.text(min_size=1, max_size=20).filter(str.strip).filter(imagecode.is_plain_name)
labelled_files = st.dictionaries(
    set_names,
    st.dictionaries(st.sampled_from([str(i) for i in range(10)]), descriptions, min_size=1, max_size=3),
    max_size=4,
)
test_files = st.dictionaries(set_names, st.lists(descriptions, min_size=1, max_size=3), max_size=4)
caption_files = st.lists(
    st.fixed_dictionaries(
        {
            "image": st.text(min_size=1, max_size=20).filter(str.strip).filter(inside_root),
            "caption": descriptions | st.lists(descriptions, min_size=1, max_size=3),
        }
    ),
    max_size=5,
)


def mutate(data: object, draw) -> object:
    """Replaces one node (a value, a key, a list item) somewhere in `data` with random JSON, or deletes it."""
    data = copy.deepcopy(data)
    path = []
    node = data
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append((node, key))
        node = node[key]
    if not path:
        return draw(json_values)
    parent, key = path[-1]
    action = draw(st.sampled_from(["replace", "delete", "rename"]))
    if action == "replace":
        parent[key] = draw(json_values)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = parent.pop(key)
    return data


def check_annotations(data: object, split: str, on_error: str) -> None:
    try:
        parsed = imagecode.parse_annotations(data, "f.json", split, ErrorPolicy(on_error, "fuzz"))
    except DataError as error:
        assert "f.json" in str(error)
        return
    for a in parsed:
        assert isinstance(a.set_name, str) and a.set_name.strip() and imagecode.is_plain_name(a.set_name)
        assert isinstance(a.description, str) and a.description.strip() == a.description and a.description
        assert (0 <= a.target <= 9) if split == "train" else a.target is None


def check_captions(data: object, on_error: str) -> None:
    try:
        parsed = captions.parse_captions(data, "c.json", ErrorPolicy(on_error, "fuzz"))
    except DataError as error:
        assert "c.json" in str(error)
        return
    for image, texts in parsed:
        assert isinstance(image, str) and image and texts and all(isinstance(t, str) and t for t in texts)
        assert inside_root(image)


@settings(max_examples=150, deadline=None)
@given(data=json_values, split=st.sampled_from(["train", "test"]), on_error=st.sampled_from(["raise", "skip"]))
def test_random_json_in_imagecode_files(data, split, on_error):
    check_annotations(data, split, on_error)


@settings(max_examples=150, deadline=None)
@given(valid=labelled_files, test=test_files, on_error=st.sampled_from(["raise", "skip"]), draw=st.data())
def test_mutated_imagecode_records(valid, test, on_error, draw):
    check_annotations(valid, "train", "raise")  # unmutated: must parse
    check_annotations(test, "test", "raise")
    assert len(imagecode.parse_annotations(valid, "f", "valid", ErrorPolicy("raise", "x"))) == sum(
        map(len, valid.values())
    )
    check_annotations(mutate(valid, draw.draw), "train", on_error)
    check_annotations(mutate(test, draw.draw), "test", on_error)


@settings(max_examples=150, deadline=None)
@given(data=json_values, on_error=st.sampled_from(["raise", "skip"]))
def test_random_json_in_caption_files(data, on_error):
    check_captions(data, on_error)


@settings(max_examples=150, deadline=None)
@given(entries=caption_files, on_error=st.sampled_from(["raise", "skip"]), draw=st.data())
def test_mutated_caption_records(entries, on_error, draw):
    assert len(captions.parse_captions(entries, "c.json", ErrorPolicy("raise", "x"))) == len(entries)
    check_captions(mutate(entries, draw.draw), on_error)


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()))
@example(content=b'{"a\\u0000b": {"1": "x"}, "../x": {"1": "y"}, "": {"1": "z"}}')
def test_files_of_random_bytes_parse_or_raise_data_error(content):
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "train_data.json")
        with open(path, "wb") as f:
            f.write(content)
        try:
            imagecode.read_split(root, "train", on_error="skip")
        except DataError as error:
            assert "train_data.json" in str(error)
        try:
            captions.read_captions([path], root, on_error="skip", check_images=False)
        except DataError as error:
            assert "train_data.json" in str(error)
