"""TMIM's mask choice (per example or, as the authors, per batch), visible-only encoding, pixel targets and
the decoder's dropout."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax.models import tmim
from contextblip_jax.models.config import TMIMConfig
from contextblip_jax.models.contextblip import ContextBLIP, set_dropout
from tests.tiny import tiny_contextblip


def test_chosen_patches_are_the_top_k_of_the_chosen_row():
    rng = np.random.default_rng(0)
    batch, length, patches = 3, 5, 16
    attention = rng.uniform(0, 0.01, (batch, length, patches)).astype(np.float32)
    winners = [[2, 7, 11, 14], [0, 1, 2, 3], [15, 9, 4, 6]]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    for b, patches_b in enumerate(winners):
        attention[b, :, patches_b] = 1.0  # every real row prefers these, far above the 0.02 noise
    config = TMIMConfig(mask_rate=0.25)
    for seed in range(10):
        chosen = tmim.text_guided_mask(jax.random.key(seed), jnp.asarray(attention), jnp.asarray(mask), config)
        for b in range(batch):
            assert chosen.masked[b].tolist() == sorted(winners[b])
            assert sorted(chosen.visible[b].tolist()) == sorted(set(range(patches)) - set(winners[b]))


def test_the_row_of_the_chosen_position_decides():
    """Distinct rows per position: the mask equals the top-k of exactly one real position's row."""
    rng = np.random.default_rng(1)
    attention = np.stack([rng.permutation(16) * 10.0 for _ in range(4)])[None].astype(np.float32)
    mask = jnp.array([[1, 1, 1, 0]])
    config = TMIMConfig(mask_rate=0.25, noise=0.0)
    seen = set()
    for seed in range(30):
        masked = tmim.text_guided_mask(jax.random.key(seed), jnp.asarray(attention), mask, config).masked[0].tolist()
        rows = [sorted(np.argsort(-attention[0, t])[:4].tolist()) for t in range(3)]
        assert masked in rows
        seen.add(tuple(masked))
    assert len(seen) > 1  # the position is random per draw


def test_padding_positions_are_never_chosen():
    mask = jnp.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    for seed in range(200):
        positions = tmim.choose_text_positions(jax.random.key(seed), mask)
        assert all(mask[b, p] == 1 for b, p in enumerate(positions.tolist()))
    drawn = {int(tmim.choose_text_positions(jax.random.key(s), mask)[2]) for s in range(200)}
    assert drawn == {0, 1, 2, 3, 4}


def test_random_mask_ignores_attention():
    attention = jnp.zeros((2, 3, 16)).at[:, :, :4].set(1.0)
    chosen = tmim.text_guided_mask(jax.random.key(0), attention, jnp.ones((2, 3)), TMIMConfig(random_mask=True))
    assert chosen.masked.shape == (2, 4)
    assert chosen.masked[0].tolist() != [0, 1, 2, 3] or chosen.masked[1].tolist() != [0, 1, 2, 3]


def test_masked_pixels_never_reach_the_encoder():
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    mask = tmim.split_patches(jnp.asarray(rng.standard_normal((2, 16))), 4)
    before = model.encode_visible(jnp.asarray(images), mask.visible)
    changed = images.copy()
    for b in range(2):
        for index in mask.masked[b].tolist():
            r, c = divmod(index, 4)
            changed[b, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = rng.standard_normal((8, 8, 3)) * 100
    chex.assert_trees_all_equal(model.encode_visible(jnp.asarray(changed), mask.visible), before)
    visible_patch = mask.visible[0, 0].item()
    r, c = divmod(visible_patch, 4)
    changed[0, r * 8, c * 8] += 1.0
    assert not np.allclose(model.encode_visible(jnp.asarray(changed), mask.visible), before)


def test_targets_are_the_masked_patches_of_the_input():
    images = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    masked = jnp.array([[0, 5, 10, 15], [3, 4, 12, 13]])
    targets = tmim.gather_patches(tmim.patchify(jnp.asarray(images), 8), masked)
    for b in range(2):
        for k, index in enumerate(masked[b].tolist()):
            r, c = divmod(index, 4)
            np.testing.assert_array_equal(
                targets[b, k], images[b, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].reshape(-1)
            )


def test_mean_cross_attention_drops_cls_and_stops_gradient():
    maps = [jnp.full((1, 2, 3, 5), float(i)) for i in range(3)]
    mean = tmim.mean_cross_attention(maps)
    assert mean.shape == (1, 3, 4)
    np.testing.assert_allclose(mean, 1.0)
    grad = jax.grad(lambda m: tmim.mean_cross_attention([m]).sum())(maps[0])
    np.testing.assert_array_equal(grad, 0.0)


def test_stage_one_compiles_once_for_any_mask():
    """Every example masks the same number of patches, so new keys and new text masks reuse one executable."""
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, key, attention_mask):
        return nnx.merge(graphdef, state).pretrain_losses(images, ids, attention_mask, key)

    images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)
    ids = jnp.array([[30523, 5, 6, 7, 102], [30523, 8, 102, 0, 0], [30523, 9, 10, 102, 0]])
    for seed, cut in ((0, 5), (1, 3), (2, 4)):
        mask = (jnp.arange(5)[None] < jnp.array([[5], [cut], [4]])).astype(jnp.int32)
        result = losses(state, jax.random.key(seed), mask)
        assert np.isfinite(float(result["tmim"]))
    assert losses._cache_size() == 1


def test_batch_token_is_one_position_for_the_whole_batch_padding_included():
    """The authors' draw: one position in 0..T-1 for every example, so short captions get padding rows."""
    mask = jnp.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    drawn = set()
    for seed in range(200):
        positions = tmim.choose_text_positions(jax.random.key(seed), mask, "batch").tolist()
        assert positions == [positions[0]] * 3
        drawn.add(positions[0])
    assert drawn == set(range(6))
    with pytest.raises(ValueError, match="unknown"):
        tmim.choose_text_positions(jax.random.key(0), mask, "word")


def test_batch_token_guides_every_mask_by_the_same_row():
    """Distinct rows per position: every example's mask is the top-k of the same position's row."""
    rng = np.random.default_rng(3)
    attention = jnp.asarray(np.stack([[rng.permutation(16) * 10.0 for _ in range(4)] for _ in range(3)]))
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    config = TMIMConfig(mask_rate=0.25, noise=0.0)
    for seed in range(10):
        masked = tmim.text_guided_mask(jax.random.key(seed), attention, mask, config, "batch").masked.tolist()
        rows = [[sorted(np.argsort(-np.asarray(attention[b, t]))[:4].tolist()) for b in range(3)] for t in range(4)]
        assert masked in rows


def test_decoder_dropout_runs_only_with_rngs_and_follows_the_key():
    """The decoder's BERT dropout at 0.1 (the authors' `bert_config.json`): the key decides it; no rngs, no
    dropout."""
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    width, text_width = model.config.blip.vision.width, model.config.blip.text.width
    encoded = jnp.asarray(rng.standard_normal((2, 13, width)), jnp.float32)
    mask = tmim.split_patches(jnp.asarray(rng.standard_normal((2, 16))), 4)
    text = jnp.asarray(rng.standard_normal((2, 5, text_width)), jnp.float32)
    text_mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    plain = model.tmim(encoded, mask, text, text_mask)
    set_dropout(model, text=0.0, tmim=0.1)

    def run(seed: int | None) -> np.ndarray:
        rngs = None if seed is None else nnx.Rngs(dropout=jax.random.key(seed))
        return np.asarray(model.tmim(encoded, mask, text, text_mask, rngs))

    first = run(0)
    np.testing.assert_array_equal(run(None), plain)
    assert not np.allclose(first, plain, atol=1e-3)
    assert not np.allclose(first, run(1), atol=1e-3)
    np.testing.assert_array_equal(run(0), first)
