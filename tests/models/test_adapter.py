"""The multi-level adapter: exact parameter count, identity when its up-projection is zero, conv branch."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax.models.config import AdapterConfig, ContextBLIPConfig
from contextblip_jax.models.contextblip import ContextBLIP
from tests.tiny import tiny_contextblip


def params(module) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


@functools.cache
def abstract_base_model() -> ContextBLIP:
    """The default (ViT-B/16) model as shapes only, built once: tracing its initialisers takes seconds."""
    return nnx.eval_shape(lambda: ContextBLIP(ContextBLIPConfig(), rngs=nnx.Rngs(0)))


@pytest.mark.xdist_group("abstract_base_model")  # one worker builds it once
def test_base_parameter_counts_match_the_reference():
    model = abstract_base_model()
    assert params(model.adapter) == 2_359_296
    assert params(model.context) == 14_183_424  # two BERT layers + 10 x 768 positions
    assert params(model.head) == 769
    assert 38_000_000 < params(model.tmim) < 40_000_000  # "TMIM parts ≈ 39M"
    fine_tuned = params(model) - params(model.tmim)
    assert 239_000_000 < fine_tuned < 241_000_000  # "≈ 240M fine-tuned"


def images(batch: int = 2) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal((batch, 32, 32, 3)), jnp.float32)


def test_zero_up_projection_gives_plain_blip_features_exactly():
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    model.adapter.up.kernel[...] = jnp.zeros_like(model.adapter.up.kernel[...])
    adapted, plain = model.adapted_features(images())
    chex.assert_trees_all_equal(adapted, plain)
    chex.assert_trees_all_equal(plain, model.blip.image_features(images()))


def test_adapter_changes_features_and_uses_the_configured_levels():
    model = ContextBLIP(tiny_contextblip(adapter=AdapterConfig(levels=(2, 4))), rngs=nnx.Rngs(0))
    adapted, plain = model.adapted_features(images())
    assert not np.allclose(adapted, plain)
    out = model.blip.vision(images())
    expected = plain + jax.nn.relu(
        jnp.concatenate(
            [
                jax.nn.relu(model.blip.vision.norm(out.block_outputs[i]) @ model.adapter.down[k].kernel[...])
                for k, i in enumerate((1, 3))
            ],
            axis=-1,
        )
        @ model.adapter.up.kernel[...]
    )
    np.testing.assert_allclose(adapted, expected, atol=1e-5)


def test_conv_branch_is_off_by_default_and_works_on_patch_subsets():
    assert len(ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0)).adapter.convs) == 0
    config = tiny_contextblip(adapter=AdapterConfig(levels=(1, 2, 3, 4), conv_kernels=(1, 3)))
    model = ContextBLIP(config, rngs=nnx.Rngs(0))
    x = images()
    adapted, _ = model.adapted_features(x)
    assert adapted.shape == (2, 17, 32)
    model.adapter.up.kernel[...] = jnp.zeros_like(model.adapter.up.kernel[...])
    adapted, plain = model.adapted_features(x)
    np.testing.assert_array_equal(adapted[:, 0], plain[:, 0])  # CLS gets nothing from the grid convolutions
    assert not np.allclose(adapted[:, 1:], plain[:, 1:])
    visible = jnp.array([[0, 3, 5, 9, 15], [1, 2, 4, 8, 12]])
    assert model.encode_visible(x, visible).shape == (2, 6, 32)
    assert dataclasses.asdict(config)["adapter"]["conv_kernels"] == (1, 3)


@pytest.mark.xdist_group("abstract_base_model")  # one worker builds it once
def test_default_levels_scale_with_depth():
    assert AdapterConfig().resolved_levels(12) == (3, 6, 9, 12)
    assert AdapterConfig().resolved_levels(24) == (6, 12, 18, 24)
    assert AdapterConfig(levels=(2, 5)).resolved_levels(24) == (2, 5)
    assert abstract_base_model().adapter.levels == (3, 6, 9, 12)


def test_switched_off_it_adds_nothing_and_every_other_weight_is_drawn_as_with_it_on():
    on = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    off = ContextBLIP(tiny_contextblip(adapter=AdapterConfig(levels=(1, 2, 3, 4), enabled=False)), rngs=nnx.Rngs(0))
    x = images()
    adapted, plain = off.adapted_features(x)
    chex.assert_trees_all_equal(adapted, plain)
    assert not np.allclose(on.adapted_features(x)[0], plain)
    visible = jnp.array([[0, 3, 5, 9, 15], [1, 2, 4, 8, 12]])
    vit = off.blip.vision
    tokens = vit.transform(
        jnp.concatenate([vit.cls_tokens(2), jnp.take_along_axis(vit.patch_tokens(x), visible[..., None], 1)], 1)
    )
    chex.assert_trees_all_equal(off.encode_visible(x, visible), tokens.last_hidden_state)
    chex.assert_trees_all_equal(nnx.state(on, nnx.Param), nnx.state(off, nnx.Param))
    assert ContextBLIPConfig.from_dict({**tiny_contextblip().to_dict(), "adapter": {"levels": [1]}}).adapter.enabled
