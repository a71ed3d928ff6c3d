"""The text tower: padding is invisible, cross-attention is optional and returns its maps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from contextblip_jax.models.text import TextEncoder
from contextblip_jax.models.variants import VARIANTS

TINY = VARIANTS["tiny"].blip.text


def test_padding_tokens_do_not_change_real_positions():
    model = TextEncoder(TINY, rngs=nnx.Rngs(0))
    mask = jnp.array([[1, 1, 1, 0, 0, 0]])
    ids_a = jnp.array([[5, 6, 7, 0, 0, 0]])
    ids_b = jnp.array([[5, 6, 7, 9, 31, 2]])
    image = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, TINY.encoder_width)), jnp.float32)
    for tokens in (None, image):
        a = model(ids_a, mask, tokens).last_hidden_state[:, :3]
        b = model(ids_b, mask, tokens).last_hidden_state[:, :3]
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_cross_attention_maps_only_with_image_tokens():
    model = TextEncoder(TINY, rngs=nnx.Rngs(0))
    ids, mask = jnp.array([[5, 6, 7, 8]]), jnp.ones((1, 4), jnp.int32)
    assert model(ids, mask).cross_attention == ()
    image = jnp.ones((1, 5, TINY.encoder_width))
    out = model(ids, mask, image, jnp.ones((1, 5), bool))
    assert len(out.cross_attention) == TINY.depth
    assert out.cross_attention[0].shape == (1, TINY.num_heads, 4, 5)
    np.testing.assert_allclose(out.cross_attention[0].sum(-1), 1.0, atol=1e-6)
    with_image = out.last_hidden_state
    assert not np.allclose(with_image, model(ids, mask).last_hidden_state)
