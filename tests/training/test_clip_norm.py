"""Global gradient-norm clipping before the optimizer (`optimizer.clip_norm`): a spike is cut down to the norm
before Adam sees it, so its moments stay those of ordinary steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training import optim


def second_moments(clip_norm: float, gradient_norm: float) -> float:
    config = base_config().optimizer
    config.clip_norm = clip_norm
    params = {"blip.w": jnp.zeros(4), "head.w": jnp.zeros(4)}
    tx = optim.build_optimizer(config, params, steps_per_epoch=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, gradient_norm / np.sqrt(8)), params)
    _, state = tx.update(grads, tx.init(params), params)
    moments = jax.tree.leaves([nu for _, nu in optax.tree_utils.tree_get_all_with_path(state, "nu")])
    return float(sum(jnp.sum(nu) for nu in moments))


def test_a_spike_reaches_adam_at_the_clip_norm_only_when_clipping():
    b2 = base_config().optimizer.b2
    np.testing.assert_allclose(second_moments(1.0, 1000.0), (1 - b2) * 1.0, rtol=1e-5)
    np.testing.assert_allclose(second_moments(1.0, 0.5), (1 - b2) * 0.25, rtol=1e-5)  # below the norm: untouched
    np.testing.assert_allclose(second_moments(0.0, 1000.0), (1 - b2) * 1e6, rtol=1e-5)
