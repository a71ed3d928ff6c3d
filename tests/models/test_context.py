"""The inter-context encoder: equivariant on static sets, order-aware on video sets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from contextblip_jax.models.contextblip import ContextBLIP
from tests.tiny import tiny_contextblip


def inputs(batch: int = 2):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, 10, 32, 32, 3)), jnp.float32)
    ids = jnp.array([[30523, 2417, 3899, 102, 0, 0], [30523, 1037, 2450, 2007, 102, 0]])[:batch]
    return images, ids, (ids > 0).astype(jnp.int32)


def test_static_sets_are_permutation_equivariant_video_sets_are_not():
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    images, ids, mask = inputs()
    permutation = np.random.default_rng(1).permutation(10)
    for is_video, equivariant in ((jnp.array([0, 0]), True), (jnp.array([1, 1]), False)):
        logits = model.context_logits(images, ids, mask, is_video)
        permuted = model.context_logits(images[:, permutation], ids, mask, is_video)
        matches = np.allclose(permuted, logits[:, permutation], atol=1e-5)
        assert matches == equivariant, (is_video, np.abs(permuted - logits[:, permutation]).max())


def test_residual_and_position_only_for_video():
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 10, 32)), jnp.float32)
    for layer in model.context.layers:
        layer.fc2.kernel[...] = jnp.zeros_like(layer.fc2.kernel[...])
        layer.fc2.bias[...] = jnp.zeros_like(layer.fc2.bias[...])
    static = model.context(x, jnp.array([0, 0]))
    video = model.context(x, jnp.array([1, 1]))
    assert not np.allclose(static, video)
    np.testing.assert_allclose(model.context(x, jnp.array([0, 1]))[0], static[0], atol=1e-6)


def test_dropout_only_with_rngs():
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 10, 32)), jnp.float32)
    video = jnp.array([1])
    np.testing.assert_array_equal(model.context(x, video), model.context(x, video))
    a = model.context(x, video, rngs=nnx.Rngs(dropout=0))
    b = model.context(x, video, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, model.context(x, video, rngs=nnx.Rngs(dropout=0)))
