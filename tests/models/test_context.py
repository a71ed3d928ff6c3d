"""The inter-context encoder: equivariant on static sets, order-aware on video sets; the scoring head's scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax.models.blip import l2_normalize
from contextblip_jax.models.config import HeadConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import Dense
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


def test_logit_scale_is_off_by_default_and_a_learned_multiplier_when_set():
    images, ids, mask = inputs()
    plain = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    assert plain.head.log_scale is None
    assert not any("log_scale" in str(path) for path, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    scaled = ContextBLIP(tiny_contextblip(head=HeadConfig(logit_scale=10.0)), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        scaled.finetune_logits(images, ids, mask), 10 * plain.finetune_logits(images, ids, mask), rtol=1e-5
    )
    targets = jnp.array([3, 7])

    def loss(head):
        logits = head(l2_normalize(scaled._candidates(images, ids, mask)))
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1).sum()

    grads = nnx.grad(loss)(scaled.head)
    assert float(jnp.abs(grads.log_scale[...])) > 0
    with pytest.raises(ValueError, match="logit_scale"):
        tiny_contextblip(head=HeadConfig(logit_scale=-1.0)).validate()


def near_duplicates(width: int, count: int = 10) -> jax.Array:
    """[1, count, width] unit vectors at cosine ≈ 0.999 from one another, like the ITM vectors of video frames."""
    rng = np.random.default_rng(4)
    base = rng.standard_normal(width)
    x = base / np.linalg.norm(base) + 0.03 * rng.standard_normal((count, width)) / np.sqrt(width)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)[None]


def set_logits_near(dense: Dense, x: jax.Array, target: float, seed: int) -> None:
    """Gives `dense` a kernel whose logits on the candidates `x` lie near `target` (5: bfloat16's spacing there is
    0.03) and differ between candidates by a few hundredths; no bias."""
    base = np.asarray(x[0].mean(axis=0), np.float64)
    kernel = 6 * np.random.default_rng(seed).standard_normal((base.size, dense.kernel.shape[1])) / np.sqrt(base.size)
    kernel += np.outer(base, target - base @ kernel) / (base @ base)
    dense.kernel[...] = jnp.asarray(kernel, jnp.float32)
    dense.bias[...] = jnp.zeros_like(dense.bias[...])


def assert_same_order(float32_scores: jax.Array, bfloat16_scores: jax.Array) -> None:
    """Every pair of candidates whose float32 scores differ by more than 1e-3 is ordered alike (a tie fails)."""
    assert bfloat16_scores.dtype == jnp.float32
    a, b = np.asarray(float32_scores, np.float64).ravel(), np.asarray(bfloat16_scores, np.float64).ravel()
    apart = np.abs(a[:, None] - a[None, :]) > 1e-3
    assert apart.sum() >= 2 * 40, apart.sum() // 2  # at least 40 of the 45 pairs are compared
    np.testing.assert_array_equal(np.sign(b[:, None] - b[None, :])[apart], np.sign(a[:, None] - a[None, :])[apart])


def test_heads_and_context_rank_near_duplicates_in_float32_whatever_the_compute_dtype():
    """The same float32 normalised vectors go into a float32 and a bfloat16 model with the same parameters: the
    zero-shot ITM score, the scoring head and the inter-context encoder rank them alike."""
    models = [ContextBLIP(tiny_contextblip(), dtype=dtype, rngs=nnx.Rngs(0)) for dtype in (jnp.float32, jnp.bfloat16)]
    x = near_duplicates(tiny_contextblip().blip.text.width)
    for model in models:
        set_logits_near(model.blip.itm_head, x, 5.0, seed=6)
        set_logits_near(model.head.proj, x, 5.0, seed=7)
    assert_same_order(*[jax.nn.softmax(model.blip.itm_head(x), axis=-1)[..., 1] for model in models])
    assert_same_order(*[model.head(x) for model in models])
    assert_same_order(*[model.head(model.context(x, jnp.array([1]))) for model in models])
