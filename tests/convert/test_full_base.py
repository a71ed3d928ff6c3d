"""Full-size parity (ViT-B/16 at 384 px + BERT-base, 223.7M random parameters). Slow: `pytest -m slow`."""

from __future__ import annotations

import time

import jax
import pytest
from flax import nnx

from contextblip_jax.convert import load_blip
from tests import blip_factory as bf
from tests.convert.test_parity import assert_parity, run_convert


@pytest.mark.slow
def test_full_base_configuration(tmp_path):
    start = time.perf_counter()
    model = bf.hf_model(bf.BASE_CONFIG)
    folder = bf.save_hf(model, str(tmp_path / "hf"))
    spec = dict(bf.BASE_CONFIG, text=dict(bf.BASE_CONFIG["text"], max_position_embeddings=35))
    inputs = bf.make_inputs(spec, batch=2)  # 35 tokens, as BLIP's demo; one text padded
    expected = bf.torch_outputs(model, inputs)
    del model
    out = tmp_path / "converted"
    result = run_convert("--input", folder, "--output", str(out))
    assert result.returncode == 0, result.stderr
    converted = load_blip(str(out))
    params = jax.tree.leaves(nnx.state(converted, nnx.Param))
    assert sum(p.size for p in params) == 223_744_258
    assert_parity(bf.max_abs_diff(bf.jax_outputs(converted, inputs), expected))
    print(f"full base parity: {time.perf_counter() - start:.1f}s wall")
