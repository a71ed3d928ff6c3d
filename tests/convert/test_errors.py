"""Bad input stops the converter with a message naming the file and every offending key; DIR stays unwritten."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from tests import blip_factory as bf
from tests.convert.test_parity import run_convert

SPEC = bf.TINY_CONFIGS["tiny_a"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    return bf.save_hf(bf.hf_model(SPEC), str(tmp_path_factory.mktemp("errors") / "hf"))


def edited_folder(hf_folder: str, destination, edit) -> str:
    """A copy of the Hugging Face folder whose tensors went through `edit(dict)`."""
    shutil.copytree(hf_folder, destination)
    path = os.path.join(destination, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return str(destination)


def assert_refused(source: str, out, *fragments: str, extra: tuple[str, ...] = ()) -> str:
    result = run_convert("--input", source, "--output", str(out), *extra)
    assert result.returncode != 0
    assert source in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr}"
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".partial" in p]
    return result.stderr


def test_missing_keys_all_named(hf_folder, tmp_path):
    gone = ["vision_model.encoder.layers.1.mlp.fc2.bias", "text_encoder.encoder.layer.0.output.LayerNorm.weight"]
    source = edited_folder(hf_folder, tmp_path / "src", lambda t: [t.pop(k) for k in gone])
    assert_refused(source, tmp_path / "out", *[f"missing key {k}" for k in gone])


def test_unused_keys_all_named(hf_folder, tmp_path):
    extra = {"text_encoder.pooler.dense.weight": np.zeros((32, 32), np.float32), "mystery": np.zeros(3, np.float32)}
    source = edited_folder(hf_folder, tmp_path / "src", lambda t: t.update(extra))
    assert_refused(source, tmp_path / "out", *[f"unused key {k}" for k in extra])


def test_shape_mismatches_all_named(hf_folder, tmp_path):
    def edit(tensors):
        tensors["itm_head.weight"] = np.zeros((3, 32), np.float32)
        tensors["vision_model.encoder.layers.0.self_attn.qkv.weight"] = np.zeros((90, 32), np.float32)

    source = edited_folder(hf_folder, tmp_path / "src", edit)
    assert_refused(
        source,
        tmp_path / "out",
        "itm_head.weight: shape (3, 32), expected (2, 32)",
        "vision_model.encoder.layers.0.self_attn.qkv.weight: shape (90, 32), expected (96, 32)",
    )


def test_model_config_contradicting_tensors(hf_folder, tmp_path):
    config = json.dumps({"vision": {"width": 64}, "text": {"depth": 5}})
    stderr = assert_refused(hf_folder, tmp_path / "out", extra=("--model-config", config))
    assert "vision.width = 64, but the tensors have 32" in stderr
    assert "text.depth = 5, but the tensors have 2" in stderr


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(str(path), tmp_path / "out", "not a readable PyTorch checkpoint")


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_truncated_file(hf_folder, tmp_path, suffix):
    full = tmp_path / f"full.{suffix}"
    if suffix == "safetensors":
        shutil.copy(os.path.join(hf_folder, "model.safetensors"), full)
    else:
        torch.save({"model": bf.original_state_dict(bf.hf_model(SPEC))}, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    assert_refused(str(cut), tmp_path / "out", "not a readable")


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_needing_code_execution_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(str(marker))}, path)
    assert_refused(str(path), tmp_path / "out", "refusing to load", "weights_only")
    assert not marker.exists()


def test_unknown_format(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    assert_refused(str(path), tmp_path / "out", "unknown checkpoint format")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert_refused(str(empty), tmp_path / "out", "holds no weights file")


def test_non_empty_output_is_kept(hf_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_convert("--input", hf_folder, "--output", str(out))
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
