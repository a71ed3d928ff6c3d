"""The text tower: padding is invisible, cross-attention is optional and returns its maps, dropout runs only
when asked, a recomputed layer keeps what its policy names."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contextblip_jax.models.contextblip import REMAT_POLICIES
from contextblip_jax.models.text import TextEncoder, set_dropout_rate
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


def dropout_inputs() -> tuple[jnp.ndarray, ...]:
    """Text with padding and image tokens: the multimodal pass, where every dropout site is used."""
    rng = np.random.default_rng(0)
    ids, mask = jnp.array([[5, 6, 7, 8, 0]]), jnp.array([[1, 1, 1, 1, 0]])
    image = jnp.asarray(rng.standard_normal((1, 5, TINY.encoder_width)), jnp.float32)
    return ids, mask, image, jnp.ones((1, 5), bool)


def test_dropout_runs_only_with_rngs_and_follows_the_key():
    """BERT's dropout (embeddings, attention, hidden states) at 0.1: the key alone decides it, also through
    remat (the layers draw the same masks recomputed); without rngs the encoder is the rate-0 one."""
    model = TextEncoder(TINY, rngs=nnx.Rngs(0))
    inputs = dropout_inputs()
    plain = model(*inputs).last_hidden_state
    set_dropout_rate(model, 0.1)

    def run(seed: int | None) -> np.ndarray:
        rngs = None if seed is None else nnx.Rngs(dropout=jax.random.key(seed))
        return np.asarray(model(*inputs, rngs=rngs).last_hidden_state)

    first = run(0)
    np.testing.assert_array_equal(run(None), plain)
    assert not np.allclose(first, plain, atol=1e-3)
    assert not np.allclose(first, run(1), atol=1e-3)
    np.testing.assert_array_equal(run(0), first)
    model.remat_policy = jax.checkpoint_policies.nothing_saveable
    np.testing.assert_allclose(run(0), first, atol=1e-6)


def test_zero_dropout_traces_no_random_ops():
    """Training always passes rngs; at rate 0 that must cost nothing, not even a mask of ones."""
    model = TextEncoder(TINY, rngs=nnx.Rngs(0))
    inputs = dropout_inputs()

    def jaxpr() -> str:
        return str(
            jax.make_jaxpr(lambda key: model(*inputs, rngs=nnx.Rngs(dropout=key)).last_hidden_state)(jax.random.key(0))
        )

    assert "random_bits" not in jaxpr()
    set_dropout_rate(model, 0.1)
    assert "random_bits" in jaxpr()


def test_remat_policies_choose_what_each_layer_keeps_not_the_gradients():
    """The multimodal pass: `full` keeps no product of a layer; `dots_no_batch` its 8 weight products
    (self-attention's fused query/key/value and output projections, cross-attention's query, key, value and output
    projections, both MLP layers: post-LN normalises the second's output); `dots` also the 2 batched products of
    each attention (scores, probabilities·values)."""
    model = TextEncoder(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids, mask, image, image_mask = dropout_inputs()

    def loss(state: nnx.State) -> jax.Array:
        return nnx.merge(graphdef, state)(ids, mask, image, image_mask).last_hidden_state.sum()

    plain = jax.tree.leaves(jax.grad(loss)(state))
    kept = {}
    for name, policy in REMAT_POLICIES.items():
        model.remat_policy = policy
        graphdef, state = nnx.split(model)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            jax.ad_checkpoint.print_saved_residuals(loss, state)
        kept[name] = sum("output of dot_general" in line for line in printed.getvalue().splitlines())
        for got, expected in zip(jax.tree.leaves(jax.grad(loss)(state)), plain, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)
    assert kept == {"full": 0, "dots_no_batch": 8 * TINY.depth, "dots": 12 * TINY.depth}
