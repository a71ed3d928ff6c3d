"""Hostile checkpoint files and model configs are refused with a clear error, and nothing else happens.

The converter reads files that come from anywhere: a hub, a colleague, a download that stopped half-way. Whatever
such a file holds (a safetensors header that lies about its tensors, a cut or bit-flipped pickle, an index naming
shards outside its folder, a pickle that would run code, a `--model-config` of the wrong shape), conversion must
stop with a ConversionError naming the file (or a ValueError naming the config field), and do nothing else: no
traceback from deep inside torch or safetensors, no huge allocation, no hang, no read outside the checkpoint's
folder, no code run. tests/convert/test_errors.py holds the first cases (half-length files, a code-running zip
pickle, random bytes in a .pth); this file fuzzes every reader with hypothesis.

Safetensors files are written byte by byte (an 8-byte little-endian header length, the JSON header, the data), so
that each lie is a lie by construction, not by a second implementation of the format's checks; honest files
from the same builder must load (`test_hand_built_safetensors_are_read`). Example counts are fixed and small, so
that the file runs in seconds; HOSTILE_EXAMPLES=N raises every test's count to N for a long one-off run.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from contextblip_jax.convert.dispatch import convert_any
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.sources import read_checkpoint
from contextblip_jax.models.config import ContextBLIPConfig, read_partial
from tests import blip_factory as bf
from tests.convert.test_errors import _RunsCode, assert_refused
from tests.data.test_json_fuzz import json_values, mutate
from tests.runs import ROOT

SPEC = bf.TINY_CONFIGS["tiny_a"]
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """`examples` per test, or HOSTILE_EXAMPLES when larger; no deadline (file writes and torch.load vary)."""
    return settings(max_examples=max(examples, EXAMPLES), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write(folder: str, name: str, content: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def refused(path: str, naming: str | None = None, *fragments: str) -> ConversionError:
    """read_checkpoint(path) must raise a ConversionError (any other exception escapes and fails the test) whose
    message names `naming` (default: `path`) and holds each fragment."""
    with pytest.raises(ConversionError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert (naming or path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def loaded_or_refused(path: str, naming: str) -> None:
    """read_checkpoint(path) either reads arrays or raises a ConversionError naming `naming` (any other exception
    escapes and fails the test); hypothesis counts which."""
    try:
        tensors = read_checkpoint(path).tensors
    except ConversionError as error:
        assert naming in str(error)
        event("refused")
    else:
        assert all(isinstance(v, np.ndarray) for v in tensors.values())
        event("loaded")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- safetensors, built by hand ------------------------------------------------------------------------------------

ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of the dtypes written here, from the safetensors format's definition."""
NUMPY_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
U64_MAX = 2**64 - 1


def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    """The header's byte length (u64 little-endian; `length` writes another), the header (JSON unless bytes), the
    tensors' bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def layouts(draw: Callable, min_tensors: int = 1, empty: bool = True) -> tuple[dict[str, Any], bytes]:
    """An honest header, tensors t0, t1, ... stored back to back, and their bytes (`empty=False`: every tensor holds
    at least one element)."""
    specs = draw(
        st.lists(
            st.tuples(st.sampled_from(sorted(ITEM_SIZES)), st.lists(st.integers(0 if empty else 1, 4), max_size=3)),
            min_size=min_tensors,
            max_size=4,
        )
    )
    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(specs):
        size = ITEM_SIZES[dtype] * math.prod(shape)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, draw(st.binary(min_size=offset, max_size=offset))


def shift_from(header: dict[str, Any], first: int, delta: int) -> None:
    """Moves tensors `first`, `first + 1`, ... by `delta` bytes."""
    for info in list(header.values())[first:]:
        info["data_offsets"] = [offset + delta for offset in info["data_offsets"]]


@st.composite
def data_past_the_end(draw: Callable) -> bytes:
    header, data = draw(layouts(empty=False))
    return safetensors_bytes(header, data[: draw(st.integers(0, len(data) - 1))])


@st.composite
def overlapping_tensors(draw: Callable) -> bytes:
    header, data = draw(layouts(min_tensors=2, empty=False))
    i = draw(st.integers(1, len(header) - 1))
    info = list(header.values())[i]
    back = draw(st.integers(1, info["data_offsets"][0]))
    info["data_offsets"] = [offset - back for offset in info["data_offsets"]]
    return safetensors_bytes(header, data)


@st.composite
def span_not_matching_shape(draw: Callable) -> bytes:
    """Contiguous and covering the file, but one tensor's span is not its shape × dtype size."""
    header, data = draw(layouts())
    i = draw(st.integers(0, len(header) - 1))
    info = list(header.values())[i]
    begin, end = info["data_offsets"]
    delta = draw(st.integers(begin - end, 64).filter(bool))
    info["data_offsets"] = [begin, end + delta]
    shift_from(header, i + 1, delta)
    data = data[:end] + bytes(delta) + data[end:] if delta > 0 else data[: end + delta] + data[end:]
    return safetensors_bytes(header, data)


@st.composite
def huge_shapes(draw: Callable) -> bytes:
    """2**40 elements or more, declared over a few real bytes (the declared span honest or not)."""
    header, data = draw(layouts(empty=False))
    name = draw(st.sampled_from(sorted(header)))
    dims = [*draw(st.lists(st.integers(1, U64_MAX), max_size=3)), draw(st.integers(2**40, U64_MAX))]
    info = header[name]
    info["shape"] = draw(st.permutations(dims))
    if draw(st.booleans()):  # a span as long as the shape says: far past the end of the file
        info["data_offsets"][1] = info["data_offsets"][0] + math.prod(dims) * ITEM_SIZES[info["dtype"]]
    return safetensors_bytes(header, data)


NOT_INTEGERS = (
    st.integers(max_value=-1)
    | st.integers(min_value=2**64)
    | st.floats()
    | st.text(max_size=4)
    | st.none()
    | st.booleans()
    | st.lists(st.integers(0, 4), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
"""JSON values that are no u64: negative, too large, fractional or integral floats, strings, null, ..."""


@st.composite
def bad_shape_entries(draw: Callable) -> bytes:
    header, data = draw(layouts())
    shape = header[draw(st.sampled_from(sorted(header)))]["shape"]
    shape.insert(draw(st.integers(0, len(shape))), draw(NOT_INTEGERS))
    return safetensors_bytes(header, data)


@st.composite
def unknown_dtypes(draw: Callable) -> bytes:
    header, data = draw(layouts())
    names = st.text(max_size=10).filter(lambda s: not re.fullmatch(r"[A-Z0-9_]*", s))  # every dtype name is
    made_up = st.sampled_from(["", "f32", "float32", "F31", "F8", "I128", "U128", "F32 ", "COMPLEX"])  # A-Z0-9_
    header[draw(st.sampled_from(sorted(header)))]["dtype"] = draw(
        names | made_up | json_values.filter(lambda v: not isinstance(v, str))
    )
    return safetensors_bytes(header, data)


@st.composite
def bad_tensor_entries(draw: Callable) -> bytes:
    header, data = draw(layouts())
    name = draw(st.sampled_from(sorted(header)))
    broken = draw(st.sampled_from(["not an object", "missing field", "offsets"]))
    if broken == "not an object":
        header[name] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif broken == "missing field":
        del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    else:
        reversed_pair = st.tuples(st.integers(1, 64), st.integers(0, 63)).filter(lambda p: p[0] > p[1]).map(list)
        header[name]["data_offsets"] = draw(
            st.lists(st.integers(0, 64), max_size=4).filter(lambda o: len(o) != 2)
            | st.lists(NOT_INTEGERS, min_size=2, max_size=2)
            | reversed_pair
        )
    return safetensors_bytes(header, data)


@st.composite
def bad_metadata(draw: Callable) -> bytes:
    """`__metadata__` must map strings to strings."""
    header, data = draw(layouts())
    header["__metadata__"] = draw(
        json_values.filter(
            lambda v: v is not None and not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
        )
    )
    return safetensors_bytes(header, data)


@st.composite
def lying_lengths(draw: Callable) -> bytes:
    """A header length field past the end of the file (up to 2**64 - 1), into the data, or short of the JSON."""
    header, data = draw(layouts())
    size = len(json.dumps(header).encode())
    return safetensors_bytes(header, data, draw(st.integers(size + 1, U64_MAX) | st.integers(0, size - 1)))


def is_json(content: bytes) -> bool:
    try:
        json.loads(content)
    except (ValueError, RecursionError):
        return False
    return True


non_json_headers = (st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: b"{" + b)).filter(
    lambda b: not is_json(b)
)
non_object_headers = json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())

LIES = {
    "data past the end of the file": data_past_the_end(),
    "overlapping tensors": overlapping_tensors(),
    "span not matching shape × dtype": span_not_matching_shape(),
    "2**40 elements or more": huge_shapes(),
    "shape entry not a u64": bad_shape_entries(),
    "unknown dtype": unknown_dtypes(),
    "tensor entry malformed": bad_tensor_entries(),
    "__metadata__ malformed": bad_metadata(),
    "header length field lying": lying_lengths(),
    "header not JSON": non_json_headers.map(lambda b: safetensors_bytes(b, b"\0" * 8)),
    "header not an object": non_object_headers.map(safetensors_bytes),
}


@fuzz(40)
@given(layout=layouts())
def test_hand_built_safetensors_are_read(layout):
    """The control: honest files from `safetensors_bytes` load, so that a refusal below is the lie's doing."""
    header, data = layout
    with tempfile.TemporaryDirectory() as folder:
        tensors = read_checkpoint(write(folder, "honest.safetensors", safetensors_bytes(header, data))).tensors
    assert sorted(tensors) == sorted(header)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        assert tensors[name].shape == tuple(info["shape"]) and tensors[name].dtype.name == NUMPY_NAMES[info["dtype"]]
        assert tensors[name].tobytes() == data[begin:end]


@fuzz(200)
@given(lie=st.sampled_from(sorted(LIES)).flatmap(lambda kind: st.tuples(st.just(kind), LIES[kind])))
@example(lie=("empty file", b""))
@example(lie=("7 bytes", b"\x10" * 7))
def test_lying_safetensors_headers_are_refused(lie):
    kind, content = lie
    event(kind)
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as folder:
        refused(write(folder, "lying.safetensors", content))
    assert peak_rss_mib() - before < 256, "a lying header made the reader allocate what it declared"


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F8_E8M0"])
def test_dtypes_numpy_lacks_are_refused_or_read(tmp_path, dtype):
    """Honest files of a dtype numpy has no type for (safetensors then looks up a numpy attribute that is not
    there): two one-byte elements."""
    path = write(
        str(tmp_path),
        "float8.safetensors",
        safetensors_bytes({"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 2]}}, bytes(2)),
    )
    try:
        tensors = read_checkpoint(path).tensors
    except ConversionError as error:
        assert path in str(error) and "dtype" in str(error)
    else:  # a numpy that knows the dtype
        assert tensors["w"].shape == (2,)


# --- every file form: truncated, random, bit-flipped ---------------------------------------------------------------

FORMATS = ("model.safetensors", "model.pth", "legacy.bin")
"""The single-file forms: safetensors, a zip pickle (torch.save's default), a legacy (pre-1.6) pickle."""


@pytest.fixture(scope="module")
def model():
    return bf.hf_model(SPEC)


@pytest.fixture(scope="module")
def hf_folder(model, tmp_path_factory) -> str:
    return bf.save_hf(model, str(tmp_path_factory.mktemp("hostile") / "hf"))


@pytest.fixture(scope="module")
def files(model, hf_folder, tmp_path_factory) -> dict[str, bytes]:
    """The tiny model in each single-file form; checked readable by `test_intact_files_are_read`."""
    folder = tmp_path_factory.mktemp("forms")
    shutil.copy(os.path.join(hf_folder, "model.safetensors"), folder / "model.safetensors")
    torch.save({"model": bf.original_state_dict(model)}, folder / "model.pth")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / "legacy.bin", _use_new_zipfile_serialization=False)
    return {name: (folder / name).read_bytes() for name in FORMATS}


def zipfile_magic(content: bytes) -> bool:
    return content[:4] == b"PK\x03\x04"


def test_intact_files_are_read(model, files, tmp_path):
    names = {
        "model.safetensors": set(model.state_dict()),
        "model.pth": set(bf.original_state_dict(model)),
        "legacy.bin": set(model.state_dict()),
    }
    assert not zipfile_magic(files["legacy.bin"]) and zipfile_magic(files["model.pth"])
    for name, content in files.items():
        assert set(read_checkpoint(write(str(tmp_path), name, content)).tensors) == names[name]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("keep", [0, 1, -1], ids=["empty", "one byte", "one byte short"])
def test_cut_at_the_edges(files, tmp_path, name, keep):
    content = files[name]
    path = write(str(tmp_path), name, content[: keep % len(content)])
    refused(path, path, "not a readable")


@pytest.mark.parametrize("name", FORMATS)
@fuzz(25)
@given(data=st.data())
def test_truncated_files_are_refused(files, name, data):
    content = files[name]
    kept = data.draw(st.integers(0, len(content) - 1), label="bytes kept")
    with tempfile.TemporaryDirectory() as folder:
        refused(write(folder, name, content[:kept]))


@pytest.mark.parametrize("name", [*FORMATS, "model.pt"])
@fuzz(25)
@given(prefix=st.integers(0, 512), noise=st.binary(max_size=2048))
def test_random_bytes_are_refused(files, name, prefix, noise):
    """Random bytes, after a real file's first bytes (its magic numbers) to reach past the first checks."""
    content = files.get(name, files["model.pth"])[:prefix] + noise
    with tempfile.TemporaryDirectory() as folder:
        refused(write(folder, name, content))


@pytest.mark.parametrize("name", FORMATS)
@fuzz(40)
@given(flips=st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=8))
def test_bit_flipped_files_load_or_are_refused(files, name, flips):
    """A changed byte may land in tensor data (the file still loads); anywhere else it must be refused."""
    content = bytearray(files[name])
    for position, value in flips:
        content[position % len(content)] = value
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, name, bytes(content))
        loaded_or_refused(path, path)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (torch.empty(2, device="meta"), "'w' has no numpy form"),
        (torch.eye(3).to_sparse(), "'w' has no numpy form"),
        (torch.zeros(2, dtype=torch.float8_e4m3fn), "'w' has no numpy form"),
        ({"nested": torch.zeros(2)}, "'w' is not a tensor"),
    ],
    ids=["meta", "sparse", "float8", "nested dict"],
)
def test_pickled_entries_without_an_array_are_refused(tmp_path, entry, fragment):
    path = str(tmp_path / "odd.pth")
    torch.save({"w": entry}, path)
    refused(path, path, fragment)


def test_pickled_keys_that_are_not_names_are_refused(tmp_path):
    path = str(tmp_path / "int_keys.pth")
    torch.save({0: torch.zeros(2), "w": torch.zeros(1)}, path)
    refused(path, path, "key 0 is not a string")


READ_ONE = """
import sys
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.sources import read_checkpoint
try:
    read_checkpoint(sys.argv[1])
except ConversionError as error:
    print(error)
"""


@pytest.mark.long
@pytest.mark.parametrize("name", ["x.safetensors", "x.bin", "config.json"])
def test_fifos_are_refused_without_blocking(hf_folder, tmp_path, name):
    """A FIFO's open blocks until a writer comes; safetensors blocks holding the GIL, so the reader runs in a
    process of its own, killed if it blocks."""
    if name == "config.json":
        source = str(tmp_path / "hf")
        os.mkdir(source)
        shutil.copy(os.path.join(hf_folder, "model.safetensors"), source)
        fifo = os.path.join(source, name)
    else:
        source = fifo = str(tmp_path / name)
    os.mkfifo(fifo)
    try:
        result = subprocess.run(
            [sys.executable, "-c", READ_ONE, source], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {source} blocked on the FIFO {fifo}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert fifo in result.stdout and "not a regular file" in result.stdout, result.stdout


# --- sharded folders -----------------------------------------------------------------------------------------------

SHARDED = {
    "safetensors": ("model.safetensors.index.json", "model-{:05d}-of-00002.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model-{:05d}-of-00002.bin"),
}


def write_shard(path: str, tensors: dict[str, np.ndarray]) -> None:
    if path.endswith(".safetensors"):
        save_file(tensors, path)
    else:
        torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)


@pytest.fixture(scope="module")
def tensors(hf_folder) -> dict[str, np.ndarray]:
    return load_file(os.path.join(hf_folder, "model.safetensors"))


@pytest.fixture(scope="module")
def sharded(hf_folder, tensors, tmp_path_factory) -> dict[str, str]:
    """{kind: folder}: the tiny model in two shards plus Hugging Face's index, beside its config.json."""
    folders = {}
    for kind, (index_name, pattern) in SHARDED.items():
        folder = str(tmp_path_factory.mktemp(f"sharded_{kind}"))
        shutil.copy(os.path.join(hf_folder, "config.json"), folder)
        names = sorted(tensors)
        weight_map = {}
        for number, part in enumerate((names[::2], names[1::2]), 1):
            shard = pattern.format(number)
            write_shard(os.path.join(folder, shard), {k: tensors[k] for k in part})
            weight_map.update(dict.fromkeys(part, shard))
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
        with open(os.path.join(folder, index_name), "w") as f:
            json.dump(index, f)
        folders[kind] = folder
    return folders


def copy_with_index(folder: str, kind: str, destination: str, index: bytes) -> str:
    """A copy of a sharded folder whose index holds `index`; the index's path."""
    shutil.copytree(folder, destination)
    return write(destination, SHARDED[kind][0], index)


def read_index(folder: str, kind: str) -> dict[str, Any]:
    with open(os.path.join(folder, SHARDED[kind][0])) as f:
        return json.load(f)


@pytest.mark.parametrize("kind", sorted(SHARDED))
def test_intact_sharded_folders_are_read(sharded, tensors, kind):
    read = read_checkpoint(sharded[kind]).tensors
    assert sorted(read) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name], value)


def garbled_indexes(index_text: bytes) -> st.SearchStrategy[bytes]:
    """Index files that cannot be read as one: cut, random bytes, not an object, a weight_map of the wrong shape."""
    index = json.loads(index_text)
    not_a_map = json_values.filter(lambda v: not isinstance(v, dict))
    not_names = st.dictionaries(st.text(max_size=5), json_values.filter(lambda v: not isinstance(v, str)), min_size=1)
    return st.one_of(
        st.integers(0, len(index_text.rstrip()) - 1).map(lambda kept: index_text[:kept]),  # into the JSON
        st.binary(max_size=256).filter(lambda b: not is_json(b)),
        json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        not_a_map.map(lambda v: json.dumps({**index, "weight_map": v}).encode()),
        not_names.map(lambda v: json.dumps({**index, "weight_map": {**index["weight_map"], **v}}).encode()),
        st.just(json.dumps({"metadata": index["metadata"]}).encode()),
        st.integers(1000, 5000).map(lambda depth: b'{"weight_map": ' + b"[" * depth + b"]" * depth + b"}"),
    )


@pytest.mark.parametrize("kind", sorted(SHARDED))
@fuzz(40)
@given(data=st.data())
def test_garbled_indexes_are_refused(sharded, kind, data):
    with open(os.path.join(sharded[kind], SHARDED[kind][0]), "rb") as f:
        garbled = data.draw(garbled_indexes(f.read()), label="index")
    with tempfile.TemporaryDirectory() as root:
        index_path = copy_with_index(sharded[kind], kind, os.path.join(root, "copy"), garbled)
        refused(os.path.dirname(index_path), index_path)


@pytest.mark.parametrize("kind", sorted(SHARDED))
@fuzz(30)
@given(data=st.data())
def test_mutated_indexes_load_or_are_refused(sharded, kind, data):
    """Random changes anywhere in the index (a shard name among them): loaded, or refused naming a file of the
    folder."""
    mutated = mutate(read_index(sharded[kind], kind), data.draw)
    with tempfile.TemporaryDirectory() as root:
        index_path = copy_with_index(sharded[kind], kind, os.path.join(root, "copy"), json.dumps(mutated).encode())
        folder = os.path.dirname(index_path)
        loaded_or_refused(folder, folder)


@pytest.fixture(scope="module")
def outside(tensors, tmp_path_factory) -> str:
    """`root/inner/`, an empty folder for an index, and a valid shard where a name may lead out of it:
    `root/outside.safetensors` (read, it would make the index load), and `root/inner/shards/outside.safetensors`."""
    root = str(tmp_path_factory.mktemp("root"))
    os.makedirs(os.path.join(root, "inner", "shards"))
    write_shard(os.path.join(root, "outside.safetensors"), tensors)
    write_shard(os.path.join(root, "inner", "shards", "outside.safetensors"), tensors)
    return os.path.join(root, "inner")


path_parts = st.lists(
    st.sampled_from(["..", ".", "", "inner", "shards", "outside.safetensors"]), min_size=1, max_size=5
)


@fuzz(40)
@given(parts=path_parts, separator=st.sampled_from(["/", "\\"]), absolute=st.booleans())
@example(parts=["..", "outside.safetensors"], separator="/", absolute=False)
@example(parts=["outside.safetensors"], separator="/", absolute=True)
@example(parts=["shards", "..", "..", "outside.safetensors"], separator="/", absolute=False)
def test_shards_outside_the_folder_are_refused(outside, parts, separator, absolute):
    """A shard name must be a file name in the index's folder, whatever it is made of."""
    inner = outside
    root = os.path.dirname(inner)
    shard = (root + separator if absolute else "") + separator.join(parts)
    index_path = write(
        inner, "model.safetensors.index.json", json.dumps({"weight_map": {"itm_head.bias": shard}}).encode()
    )
    target = os.path.normpath(os.path.join(inner, shard))
    escapes = os.path.commonpath([inner, target]) != inner
    event("escapes the folder" if escapes else "stays inside")
    error = refused(inner, inner)  # the index, or a shard inside (`shards` is a folder: not a regular file)
    if escapes:
        assert index_path in str(error) and "not a file name in the index's folder" in str(error)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_code_running_shard_is_refused(sharded, tmp_path, legacy):
    """An index whose second shard is a pickle that would run code on loading (open a marker file)."""
    marker = tmp_path / "code_ran"
    folder = str(tmp_path / "copy")
    shutil.copytree(sharded["bin"], folder)
    shard = os.path.join(folder, SHARDED["bin"][1].format(2))
    torch.save(
        {"w": torch.zeros(2), "payload": _RunsCode(str(marker))}, shard, _use_new_zipfile_serialization=not legacy
    )
    refused(folder, shard, "refusing to load", "weights_only")
    assert not marker.exists()


def test_code_running_legacy_bin_is_refused(tmp_path):
    """The legacy pickle container (test_errors.py has the zip one)."""
    marker = tmp_path / "code_ran"
    path = str(tmp_path / "evil.bin")
    torch.save(
        {"model": {"w": torch.zeros(2)}, "payload": _RunsCode(str(marker))}, path, _use_new_zipfile_serialization=False
    )
    refused(path, path, "refusing to load", "weights_only")
    assert not marker.exists()


@pytest.mark.parametrize("numel", [2**32, 2**40, 2**61], ids=["16 GiB", "4 TiB", "overflow"])
def test_legacy_storage_declaring_huge_size_is_refused(tmp_path, numel):
    """A legacy pickle declares each storage's element count before its bytes: a lie must not be allocated."""
    path = str(tmp_path / "huge.bin")
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        content = f.read()
    honest = b"K\x03Ntq"  # BININT1 3 (the storage's size), None (no view), TUPLE, BINPUT
    assert content.count(honest) == 1
    lying = content.replace(honest, b"\x8a\x08" + numel.to_bytes(8, "little") + b"Ntq")  # LONG1, 8 bytes
    before = peak_rss_mib()
    refused(write(str(tmp_path), "huge.bin", lying))
    assert peak_rss_mib() - before < 256


# --- config.json -----------------------------------------------------------------------------------------------------


def garbled_configs(config_text: bytes) -> st.SearchStrategy[bytes]:
    config = json.loads(config_text)
    not_objects = json_values.filter(lambda v: not isinstance(v, dict | None))
    return st.one_of(
        st.integers(0, len(config_text.rstrip()) - 1).map(lambda kept: config_text[:kept]),  # into the JSON
        st.binary(max_size=256).filter(lambda b: not is_json(b)),
        st.binary(max_size=64).map(lambda b: b'{"x": "\xff\xfe' + b + b'"}'),  # not UTF-8
        json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        st.integers(1000, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.tuples(st.sampled_from(["vision_config", "text_config"]), not_objects).map(
            lambda kv: json.dumps({**config, kv[0]: kv[1]}).encode()
        ),
    )


@pytest.mark.parametrize("place", ["folder", "beside .safetensors", "beside .bin"])
@fuzz(25)
@given(data=st.data())
def test_garbled_config_json_is_refused(hf_folder, files, place, data):
    with open(os.path.join(hf_folder, "config.json"), "rb") as f:
        garbled = data.draw(garbled_configs(f.read()), label="config.json")
    with tempfile.TemporaryDirectory() as folder:
        config_path = write(folder, "config.json", garbled)
        if place == "folder":
            write(folder, "model.safetensors", files["model.safetensors"])
            source = folder
        else:
            name = "model.safetensors" if place == "beside .safetensors" else "legacy.bin"
            source = write(folder, name, files[name])
        refused(source, config_path)


# --- --model-config ----------------------------------------------------------------------------------------------

POSITIVE_INTS = {
    "vision": ("width", "depth", "num_heads", "mlp_dim", "image_size", "patch_size"),
    "text": ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_positions", "encoder_width"),
    "": ("embed_dim",),
}
"""The BLIP fields that are sizes or counts: an integer above 0, and nothing else."""

not_ints = json_values.filter(lambda v: type(v) is not int) | st.floats(allow_nan=False).map(
    lambda f: float(int(f)) if math.isfinite(f) else f
)
not_numbers = json_values.filter(lambda v: type(v) not in (int, float)) | st.sampled_from(
    [math.nan, math.inf, -math.inf]
)


def deeply_nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


@st.composite
def wrong_blip_fields(draw: Callable) -> tuple[str, Any]:
    """(dotted field, a value it must refuse)."""
    section = draw(st.sampled_from(sorted(POSITIVE_INTS)))
    kind = draw(st.sampled_from(["size", "epsilon", "activation"] if section else ["size"]))
    if kind == "size":
        field = draw(st.sampled_from(POSITIVE_INTS[section]))
        value = draw(not_ints | st.integers(max_value=0) | st.integers(50, 400).map(deeply_nested))
    elif kind == "epsilon":
        field, value = "layer_norm_eps", draw(not_numbers | st.floats(max_value=0, allow_nan=False))
    else:
        known = ("gelu", "gelu_tanh", "relu", "quick_gelu")
        field, value = "activation", draw(json_values.filter(lambda v: v not in known))
    return (f"{section}.{field}" if section else field), value


def as_override(field: str, value: Any) -> dict[str, Any]:
    *sections, name = field.split(".")
    override: dict[str, Any] = {name: value}
    for section in reversed(sections):
        override = {section: override}
    return override


@fuzz(60)
@given(wrong=wrong_blip_fields())
@example(wrong=("vision.patch_size", 0))  # was a ZeroDivisionError
@example(wrong=("vision.width", "32"))
@example(wrong=("text.num_heads", True))
@example(wrong=("vision.layer_norm_eps", math.nan))
def test_wrong_blip_fields_are_named(hf_folder, wrong):
    """Through `convert_any`, which the CLI calls with the parsed --model-config."""
    field, value = wrong
    with pytest.raises(ConversionError) as info:
        convert_any(hf_folder, "blip", as_override(field, value))
    assert field in str(info.value), str(info.value)


CONTEXTBLIP_FIELDS = {
    "adapter.levels": st.one_of(
        json_values.filter(lambda v: not isinstance(v, list)),
        st.lists(not_ints, min_size=1, max_size=3),
        st.lists(st.integers(max_value=0) | st.integers(min_value=13), min_size=1, max_size=3),
    ),
    "adapter.reduction": not_ints | st.integers(max_value=0),
    "adapter.conv_kernels": st.lists(st.integers(max_value=0) | st.integers(0, 8).map(lambda k: 2 * k), min_size=1),
    "tmim.mask_rate": not_numbers | st.floats(max_value=0) | st.floats(min_value=1),
    "tmim.random_mask": json_values.filter(lambda v: not isinstance(v, bool)),
    "tmim.noise": not_numbers | st.floats(max_value=-1e-9),
    "tmim.decoder_depth": not_ints | st.integers(max_value=0),
    "tmim.decoder_heads": not_ints | st.integers(max_value=0),
    "context.num_candidates": not_ints | st.integers(max_value=0),
    "context.mlp_dim": not_ints | st.integers(max_value=0),
    "context.dropout": not_numbers | st.floats(max_value=-1e-9) | st.floats(min_value=1),
    "head.logit_scale": not_numbers | st.floats(max_value=-1e-9),
    "cls_token_id": not_ints | st.integers(max_value=-1),
    "init": json_values.filter(lambda v: v not in ("bert", "fan_in", "torch")),
    "blip.vision.width": not_ints | st.integers(max_value=0),
    "blip.text.layer_norm_eps": not_numbers | st.floats(max_value=0),
}


@fuzz(60)
@given(
    wrong=st.sampled_from(sorted(CONTEXTBLIP_FIELDS)).flatmap(lambda f: st.tuples(st.just(f), CONTEXTBLIP_FIELDS[f]))
)
def test_wrong_contextblip_fields_are_named(wrong):
    """The ContextBLIP sections, parsed as `convert_any` parses them (`override`, then `validate`)."""
    field, value = wrong
    with pytest.raises(ValueError) as info:
        ContextBLIPConfig().override(as_override(field, value)).validate()
    assert field.removeprefix("blip.") in str(info.value), str(info.value)


BLIP_FIELDS = {
    "": {"vision", "text", "embed_dim"},
    "vision": {"width", "depth", "num_heads", "mlp_dim", "image_size", "patch_size", "layer_norm_eps", "activation"},
    "text": {"vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_positions", "encoder_width",
             "layer_norm_eps", "activation"},
}  # fmt: skip


@fuzz(40)
@given(section=st.sampled_from(sorted(BLIP_FIELDS)), key=st.text(max_size=8), value=json_values)
def test_unknown_keys_are_named(hf_folder, section, key, value):
    assume(key not in BLIP_FIELDS[section])
    with pytest.raises(ConversionError) as info:
        convert_any(hf_folder, "blip", {section: {key: value}} if section else {key: value})
    name = f"{section}.{key}" if section else key
    assert f"unknown model config key {name}" in str(info.value), str(info.value)


@fuzz(20)
@given(section=st.sampled_from(["vision", "text"]), value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_sections_that_are_no_objects_are_named(hf_folder, section, value):
    with pytest.raises(ConversionError) as info:
        convert_any(hf_folder, "blip", {section: value})
    assert f"{section} must be a JSON object" in str(info.value), str(info.value)


@fuzz(60)
@given(
    text=st.one_of(
        st.text(max_size=40),
        json_values.map(json.dumps),
        st.integers(1000, 20000).map(lambda depth: '{"vision": ' + "[" * depth + "]" * depth + "}"),
    ),
    as_file=st.booleans(),
)
@example(text="[" * 100_000 + "]" * 100_000, as_file=False)  # was a RecursionError through the CLI
def test_model_config_text_is_an_object_or_refused(text, as_file):
    """`--model-config` (inline or a file): a JSON object, or a ValueError, whatever the text."""
    with tempfile.TemporaryDirectory() as folder:
        value = write(folder, "overrides.json", text.encode()) if as_file else text
        try:
            parsed = read_partial(value)
        except ValueError:
            event("refused")
        else:
            assert isinstance(parsed, dict) and json.dumps(parsed) == json.dumps(json.loads(text))
            event("object")


def test_model_config_file_not_utf8_is_refused(tmp_path):
    with pytest.raises(ValueError, match="UnicodeDecodeError"):
        read_partial(write(str(tmp_path), "overrides.json", b'{"vision": "\xff"}'))


@pytest.mark.long
def test_cli_refuses_a_deeply_nested_model_config(hf_folder, tmp_path):
    """End to end: exit status, the file named, nothing written (the JSON parser's RecursionError was a traceback)."""
    config = write(str(tmp_path), "deep.json", b"[" * 100_000 + b"]" * 100_000)
    assert_refused(hf_folder, tmp_path / "out", config, "RecursionError", extra=("--model-config", config))
