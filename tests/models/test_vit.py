"""The vision tower's own behaviour: position-embedding resampling, block outputs, input checks, what a
recomputed block keeps."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from contextblip_jax.models.config import VisionConfig
from contextblip_jax.models.contextblip import REMAT_POLICIES
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.models.vit import VisionTransformer, resample_posemb

TINY = VARIANTS["tiny"].blip.vision


@pytest.mark.parametrize(("old", "new"), [(14, 24), (24, 14), (4, 7), (7, 3), (5, 5)])
def test_resample_matches_torch_bicubic(old, new):
    rng = np.random.default_rng(old * 100 + new)
    posemb = rng.standard_normal((1, 1 + old * old, 6)).astype(np.float32)
    grid = torch.tensor(posemb[:, 1:]).reshape(1, old, old, 6).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, new * new, 6).numpy()
    resampled = resample_posemb(posemb, new)
    assert resampled.shape == (1, 1 + new * new, 6)
    np.testing.assert_array_equal(resampled[:, :1], posemb[:, :1])  # CLS kept as is
    np.testing.assert_allclose(resampled[:, 1:], expected, atol=1e-5)


def test_every_block_output_is_returned():
    model = VisionTransformer(TINY, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    out = model(images)
    assert len(out.block_outputs) == TINY.depth
    assert out.last_hidden_state.shape == (2, TINY.num_tokens, TINY.width)
    np.testing.assert_allclose(out.last_hidden_state, model.norm(out.block_outputs[-1]), atol=1e-6)
    again = model.blocks[1](out.block_outputs[0])
    np.testing.assert_allclose(out.block_outputs[1], again, atol=1e-6)


def test_transform_runs_on_a_subset_of_patches():
    """TMIM runs the blocks on CLS + visible patches only; shapes follow the input length."""
    model = VisionTransformer(TINY, rngs=nnx.Rngs(0))
    images = jnp.zeros((1, 32, 32, 3))
    patches = model.patch_tokens(images)
    visible = jnp.concatenate([model.cls_tokens(1), patches[:, :5]], axis=1)
    assert model.transform(visible).last_hidden_state.shape == (1, 6, TINY.width)


def test_wrong_image_shape_is_named():
    model = VisionTransformer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(32, 32, 3\)"):
        model(jnp.zeros((1, 3, 32, 32)))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        VisionConfig(width=30, num_heads=4).validate()
    with pytest.raises(ValueError, match="not a multiple"):
        VisionConfig(image_size=100, patch_size=16).validate()


def products_kept_and_gradients(model: VisionTransformer, images: jax.Array) -> tuple[int, list[jax.Array]]:
    """(how many matrix-product outputs the backward pass keeps, in jax's own account of its residuals; the
    gradient of the summed output with respect to every parameter)."""
    graphdef, state = nnx.split(model)

    def loss(state: nnx.State) -> jax.Array:
        return nnx.merge(graphdef, state)(images).last_hidden_state.sum()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, state)
    kept = sum("output of dot_general" in line for line in printed.getvalue().splitlines())
    return kept, jax.tree.leaves(jax.grad(loss)(state))


def test_remat_policies_choose_what_each_block_keeps_not_the_gradients():
    """`full` keeps no product of a block; `dots_no_batch` the 3 weight products whose outputs the backward pass
    reads (the fused query/key/value projection, the output projection, the first MLP layer; the second's output
    is only added); `dots` also attention's 2 batched products (scores, probabilities·values)."""
    model = VisionTransformer(TINY, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    _, plain = products_kept_and_gradients(model, images)
    kept = {}
    for name, policy in REMAT_POLICIES.items():
        model.remat_policy = policy
        kept[name], gradients = products_kept_and_gradients(model, images)
        for got, expected in zip(gradients, plain, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)
    assert kept == {"full": 0, "dots_no_batch": 3 * TINY.depth, "dots": 5 * TINY.depth}
