"""Heatmaps: the gradient the probe reads is the score's gradient (checked against finite differences of the
forward pass), the maps follow their definition, and the model comes back unchanged."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax import stages
from contextblip_jax.models import gradcam
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import AttentionProbe
from contextblip_jax.models.variants import variant

IDS = jnp.array([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
MASK = (IDS > 0).astype(jnp.int32)
ONE_SET = jnp.zeros((1, 2), jnp.int32)


@pytest.fixture(scope="module")
def model() -> ContextBLIP:
    return ContextBLIP(variant("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (1, 10, 32, 32, 3))


def _summed_score(model: ContextBLIP, images: jax.Array, offset: jax.Array, layer: int) -> float:
    """The summed `finetune` match score with `offset` added to layer `layer`'s cross-attention probabilities:
    a forward pass only."""
    attention = model.blip.text.layers[layer].cross_attn
    attention.probe = AttentionProbe(offset)
    try:
        out = model.candidate_match(images, IDS, MASK, set_index=ONE_SET)
        return float(stages.get("finetune").match(model, out.last_hidden_state[:, 0]).sum())
    finally:
        attention.probe = None


@pytest.mark.parametrize("layer", [0, 1])
def test_the_probed_gradient_matches_finite_differences(model, images, layer):
    attention = model.blip.text.layers[layer].cross_attn
    shape = (20, 4, IDS.shape[1], model.config.blip.vision.num_tokens)
    attention.probe = AttentionProbe(jnp.zeros(shape))
    graphdef, probe, rest = nnx.split(model, AttentionProbe, ...)
    attention.probe = None
    match = stages.get("finetune").match
    gradient, _, _ = gradcam._gradient(graphdef, probe, rest, images, IDS, MASK, ONE_SET, match, layer)
    direction = jax.random.normal(jax.random.key(2), shape)
    eps = 1e-2
    slope = _summed_score(model, images, eps * direction, layer) - _summed_score(model, images, -eps * direction, layer)
    numeric = slope / (2 * eps)
    analytic = float(jnp.sum(gradient * direction))
    assert abs(analytic) > 1e-4  # a direction the score responds to
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_maps_are_nonnegative_on_the_patch_grid_and_leave_the_model_as_it_was(model, images):
    before = nnx.graphdef(model), jax.tree.map(np.asarray, nnx.state(model))
    found = gradcam.heatmaps(model, stages.get("finetune").match, images, IDS, MASK, 0, ONE_SET)
    grid = model.config.blip.vision.grid
    assert found.maps.shape == (2, 10, grid, grid) and found.maps.min() >= 0 and found.maps.max() > 0
    assert nnx.graphdef(model) == before[0]
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(model)), before[1])
    scores = stages.get("finetune").score(model, {"images": images, "input_ids": IDS, "attention_mask": MASK,
                                                  stages.SET_INDEX: ONE_SET})  # fmt: skip
    np.testing.assert_allclose(found.scores, np.asarray(scores), rtol=1e-5, atol=1e-5)


def test_sets_given_once_give_the_maps_of_repeated_images(model, images):
    match = stages.get("zeroshot").match
    once = gradcam.heatmaps(model, match, images, IDS, MASK, 0, ONE_SET)
    repeated = gradcam.heatmaps(model, match, jnp.repeat(images, 2, axis=0), IDS, MASK, 0)
    np.testing.assert_allclose(once.maps, repeated.maps, rtol=1e-4, atol=1e-9)


def test_at_the_last_layer_only_the_first_token_has_a_gradient(model, images):
    """The score reads the first token's output, so the last layer's other rows cannot change it: the map is the
    first token's own, divided by the description's token count."""
    layer = len(model.blip.text.layers) - 1
    shape = (20, 4, IDS.shape[1], model.config.blip.vision.num_tokens)
    model.blip.text.layers[layer].cross_attn.probe = AttentionProbe(jnp.zeros(shape))
    graphdef, probe, rest = nnx.split(model, AttentionProbe, ...)
    model.blip.text.layers[layer].cross_attn.probe = None
    match = stages.get("finetune").match
    gradient, _, probs = gradcam._gradient(graphdef, probe, rest, images, IDS, MASK, ONE_SET, match, layer)
    assert np.abs(np.asarray(gradient)[:, :, 1:]).max() == 0 and np.abs(np.asarray(gradient)[:, :, 0]).max() > 0
    found = gradcam.heatmaps(model, match, images, IDS, MASK, -1, ONE_SET)
    first = (np.asarray(probs) * np.maximum(np.asarray(gradient), 0))[:, :, 0, 1:].mean(axis=1)  # [rows, patches]
    tokens = np.repeat(np.asarray(MASK).sum(axis=1), 10)[:, None]
    np.testing.assert_allclose(found.maps.reshape(20, -1), first / tokens, rtol=1e-5, atol=1e-12)


def test_a_layer_out_of_range_is_refused(model, images):
    with pytest.raises(ValueError, match="text encoder has 2 layers"):
        gradcam.heatmaps(model, stages.get("finetune").match, images, IDS, MASK, 2, ONE_SET)


def test_the_gradient_rule_leaves_the_attention_out(model, images):
    match = stages.get("finetune").match
    weighted = gradcam.heatmaps(model, match, images, IDS, MASK, 0, ONE_SET, rule="gradcam")
    plain = gradcam.heatmaps(model, match, images, IDS, MASK, 0, ONE_SET, rule="gradient")
    assert plain.maps.min() >= 0 and not np.allclose(plain.maps, weighted.maps)
    np.testing.assert_array_equal(plain.scores, weighted.scores)
    # each patch's attention is at most 1, so weighting by it never raises a map
    assert (weighted.maps <= plain.maps + 1e-12).all()
    with pytest.raises(ValueError, match="rule 'saliency' unknown"):
        gradcam.heatmaps(model, match, images, IDS, MASK, 0, ONE_SET, rule="saliency")
