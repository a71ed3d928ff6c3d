"""Hard-negative sampling and the loss functions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contextblip_jax import losses
from tests.runs import device_env


def test_positive_is_never_sampled():
    rng = np.random.default_rng(0)
    sample = jax.jit(losses.sample_hard_negatives, static_argnums=2)  # one program per batch size and temperature
    for seed in range(300):
        batch = int(rng.integers(2, 9))
        sim = jnp.asarray(rng.standard_normal((batch, batch)) * 5 + np.eye(batch) * 50)  # positives dominate
        for temperature in (None, 0.07):
            images, texts = sample(jax.random.key(seed), sim, temperature)
            assert (np.asarray(images) != np.arange(batch)).all() and (np.asarray(texts) != np.arange(batch)).all()


def test_harder_negatives_are_drawn_more_often():
    sim = jnp.array([[1.0, 0.9, -1.0, -1.0], [0.9, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 0.9], [-1.0, -1.0, 0.9, 1.0]])
    keys = jax.random.split(jax.random.key(0), 2000)
    images, _ = jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, 0.1))(keys)
    assert np.mean(np.asarray(images[:, 0]) == 1) > 0.95  # text 0's hardest negative image is image 1


def test_per_device_negatives_stay_in_their_block():
    """groups=2: each row's negative is another pair of its own half (a device's shard); groups=1 crosses."""
    rng = np.random.default_rng(0)
    sim = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 500)
    rows, block = np.arange(8), np.arange(8) // 4
    crossed = 0
    for groups in (2, 1):
        images, texts = jax.vmap(lambda k, g=groups: losses.sample_hard_negatives(k, sim, None, g))(keys)
        for drawn in (np.asarray(images), np.asarray(texts)):
            assert (drawn != rows).all()
            if groups == 2:
                assert (drawn // 4 == block).all()
            else:
                crossed += int((drawn // 4 != block).sum())
    assert crossed > 0.4 * 2 * 500 * 8  # 4 of a row's 7 candidates lie in the other half


def test_per_device_negatives_refuse_a_batch_that_does_not_split():
    for size, groups in ((6, 4), (4, 4)):
        with pytest.raises(ValueError, match="equal blocks of at least 2 pairs"):
            losses.sample_hard_negatives(jax.random.key(0), jnp.zeros((size, size)), None, groups)


def test_itm_loss_labels_positives_one_and_negatives_zero():
    pos = jnp.array([[0.0, 3.0], [1.0, 2.0]])
    neg = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    expected = np.mean(
        [optax.softmax_cross_entropy_with_integer_labels(pos[i], 1) for i in range(2)]
        + [optax.softmax_cross_entropy_with_integer_labels(neg[i], 0) for i in range(4)]
    )
    np.testing.assert_allclose(losses.itm_loss(pos, neg), expected, rtol=1e-6)


def test_candidate_loss_sums_descriptions():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    target = jnp.array([0, 1])
    per = [-np.log(np.exp(2) / (np.exp(2) + 2)), -np.log(1 / (2 + np.exp(5)))]
    np.testing.assert_allclose(losses.candidate_loss(logits, target), sum(per), rtol=1e-6)
    np.testing.assert_allclose(losses.candidate_loss(logits, target, "mean"), np.mean(per), rtol=1e-6)


def test_tmim_and_mask_prediction_losses():
    np.testing.assert_allclose(losses.tmim_loss(jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))), 1.0)
    np.testing.assert_allclose(losses.mask_prediction_loss(jnp.array([0.0, 0.0]), jnp.array([1.0, 0.0])), 0.25)


def test_negatives_cross_devices_on_eight_simulated_devices():
    """Under jit with the batch sharded 8 ways (as in `ContextBLIP.pretrain_losses`: similarities of sharded
    embeddings, then sampling), a text's negative image often lives on another device."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from contextblip_jax import losses
        assert jax.device_count() == 8
        mesh = Mesh(np.array(jax.devices()), ("data",))
        batch = 32
        rng = np.random.default_rng(0)
        rows = NamedSharding(mesh, P("data", None))
        image = jax.device_put(rng.standard_normal((batch, 16)).astype(np.float32), rows)
        text = jax.device_put(rng.standard_normal((batch, 16)).astype(np.float32), rows)

        @jax.jit
        def draw(key, image, text):
            return losses.sample_hard_negatives(key, image @ text.T)

        cross = 0
        for seed in range(20):
            images, texts = draw(jax.random.key(seed), image, text)
            assert len(images.sharding.device_set) == 8
            images, texts = np.asarray(images), np.asarray(texts)
            owner = np.arange(batch) // (batch // 8)
            assert (images != np.arange(batch)).all() and (texts != np.arange(batch)).all()
            cross += int((images // (batch // 8) != owner).sum() + (texts // (batch // 8) != owner).sum())
        print("cross-device negatives", cross, "of", 20 * 2 * batch)
        assert cross > 0.5 * 20 * 2 * batch
    """)
    env = device_env(8)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "cross-device negatives" in result.stdout
