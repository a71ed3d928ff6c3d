"""Numerical parity with Hugging Face's PyTorch BLIP for every checkpoint form the converter reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from contextblip_jax import storage
from contextblip_jax.convert import itm_first_token, load_blip
from tests import blip_factory as bf

TOLERANCE = 1e-4


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "contextblip_jax.convert", *args], capture_output=True, text=True, check=False
    )


def heads_override(spec: dict) -> str:
    """Original `.pth` files carry no config; a tiny model's heads are not 64 wide, so they are given."""
    return json.dumps(
        {
            "vision": {"num_heads": spec["vision"]["num_attention_heads"]},
            "text": {"num_heads": spec["text"]["num_attention_heads"]},
        }
    )


@pytest.fixture(scope="module", params=sorted(bf.TINY_CONFIGS))
def reference(request, tmp_path_factory):
    """A random PyTorch model, its outputs on padded inputs, and its Hugging Face folder."""
    spec = bf.TINY_CONFIGS[request.param]
    model = bf.hf_model(spec, seed=len(request.param))
    inputs = bf.make_inputs(spec)
    folder = bf.save_hf(model, str(tmp_path_factory.mktemp(request.param) / "hf"))
    return spec, model, inputs, bf.torch_outputs(model, inputs), folder


def assert_parity(diffs: dict[str, float]) -> None:
    print("max |diff|:", {key: f"{diff:.2e}" for key, diff in diffs.items()})  # shown with `pytest -s`
    for key, diff in diffs.items():
        assert diff <= TOLERANCE, f"{key}: max |diff| {diff:.3g} > {TOLERANCE}"


@pytest.mark.long
def test_hf_folder_through_cli(reference, tmp_path):
    _spec, _, inputs, expected, folder = reference
    out = tmp_path / "converted"
    result = run_convert("--input", folder, "--output", str(out))
    assert result.returncode == 0, result.stderr
    converted = bf.jax_outputs(load_blip(str(out)), inputs)
    assert_parity(bf.max_abs_diff(converted, expected))
    direct = bf.jax_outputs(load_blip(folder), inputs)
    for key in expected:
        np.testing.assert_array_equal(converted[key], direct[key])  # DIR and SRC are bit-identical
    assert itm_first_token(str(out)) == "cls"


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_lone_weight_file(reference, tmp_path, file_format):
    spec, model, inputs, expected, _ = reference
    path = tmp_path / f"model.{file_format}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if file_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    overrides = json.loads(heads_override(spec))
    converted = load_blip(str(path), model_config=overrides)
    assert_parity(bf.max_abs_diff(bf.jax_outputs(converted, inputs), expected))


def test_original_pth_with_extras(reference, tmp_path):
    spec, _, inputs, _, _ = reference
    model = bf.hf_model(spec, seed=7, vision_eps=1e-6)  # original BLIP's ViT LayerNorm epsilon
    expected = bf.torch_outputs(model, inputs)
    path = bf.save_original(model, str(tmp_path / "model_base_retrieval.pth"))
    out = tmp_path / "converted"
    result = run_convert("--input", path, "--output", str(out), "--model-config", heads_override(spec))
    assert result.returncode == 0, result.stderr
    assert "dropped" in result.stderr and "momentum encoders" in result.stderr
    with open(out / "conversion.json") as f:
        metadata = json.load(f)
    assert metadata["itm_first_token"] == "enc"
    assert metadata["dropped"]["momentum encoders"] > 0 and metadata["dropped"]["queues"] == 4
    assert metadata["dropped"]["text decoder"] == 2 and metadata["dropped"]["temperature"] == 1
    with open(out / "model_config.json") as f:
        assert json.load(f)["vision"]["layer_norm_eps"] == 1e-6
    assert_parity(bf.max_abs_diff(bf.jax_outputs(load_blip(str(out)), inputs), expected))


def test_position_embeddings_resampled_like_pytorch(tmp_path):
    """Running at another resolution equals Hugging Face's bicubic `interpolate_pos_encoding`."""
    spec = bf.TINY_CONFIGS["tiny_a"]
    model = bf.hf_model(spec)
    folder = bf.save_hf(model, str(tmp_path / "hf"))
    bigger = dict(spec, vision=dict(spec["vision"], image_size=56))
    inputs = bf.make_inputs(bigger)
    images = torch.tensor(inputs.images_nchw)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state.numpy()
    out = tmp_path / "converted56"
    assert run_convert("--input", folder, "--output", str(out), "--image-size", "56").returncode == 0
    converted = load_blip(str(out))
    assert converted.config.vision.image_size == 56
    diff = np.max(np.abs(np.asarray(converted.image_features(inputs.images_nhwc)) - expected))
    assert diff <= TOLERANCE
    at_load = load_blip(folder, image_size=56)
    np.testing.assert_allclose(np.asarray(at_load.image_features(inputs.images_nhwc)), expected, atol=TOLERANCE)


def test_bfloat16_storage(reference, tmp_path):
    _spec, _, inputs, expected, folder = reference
    out = tmp_path / "bf16"
    assert run_convert("--input", folder, "--output", str(out), "--dtype", "bfloat16").returncode == 0

    stored = storage.restore_params(str(out / "params"))
    assert {str(v.dtype) for v in stored.values()} == {"bfloat16"}
    f32_size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    assert sum(v.nbytes for v in stored.values()) < f32_size
    features = np.asarray(load_blip(str(out)).image_features(inputs.images_nhwc))
    # bf16 keeps 8 significant bits: features (unit scale after LayerNorm) agree to a few percent.
    assert np.max(np.abs(features - expected["features"])) < 0.1
