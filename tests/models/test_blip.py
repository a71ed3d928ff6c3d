"""BlipRetrieval as a whole: size, sharding annotations, compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from contextblip_jax.models.blip import BlipRetrieval
from contextblip_jax.models.config import BlipConfig, VisionConfig
from contextblip_jax.models.variants import VARIANTS
from tests import blip_factory as bf

TINY = VARIANTS["tiny"].blip


def count(config: BlipConfig) -> int:
    model = nnx.eval_shape(lambda: BlipRetrieval(config, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_base_parameter_count_equals_hugging_face():
    """ViT-B/16 at 384 px + BERT-base with cross-attention: the 223.7M of blip-itm-base-coco."""
    from transformers import BlipForImageTextRetrieval

    with torch.device("meta"):
        reference = BlipForImageTextRetrieval(bf.hf_config(bf.BASE_CONFIG))
    expected = sum(p.numel() for p in reference.parameters())
    assert count(BlipConfig(vision=VisionConfig(image_size=384))) == expected == 223_744_258


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: BlipRetrieval(TINY, rngs=nnx.Rngs(0)))
    names = {"embed", "mlp", "heads", "kv", "vocab", None}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.ndim, path
        assert set(axes) <= names, (path, axes)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    f32 = BlipRetrieval(TINY, rngs=nnx.Rngs(0))
    bf16 = BlipRetrieval(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    ids, mask = jnp.array([[1, 2, 3, 0], [4, 5, 6, 7]]), jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert bf16.image_features(images).dtype == jnp.bfloat16
    low, high = bf16.itm_logits(images, ids, mask), f32.itm_logits(images, ids, mask)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=5e-2)
    sims = bf16.itc_similarity(images, ids, mask)
    assert sims.shape == (2, 2) and sims.dtype == jnp.float32


def test_itm_pairs_rows_and_refuses_mismatched_batches():
    model = BlipRetrieval(TINY, rngs=nnx.Rngs(0))
    images = jnp.zeros((3, 32, 32, 3))
    ids, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        model.itm_logits(images, ids, mask)
    assert model.itc_similarity(images, ids, mask).shape == (3, 2)
