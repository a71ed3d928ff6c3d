"""Layer helpers: parameter keys drawn as `nnx.Rngs` draws them, so models built through the helpers hold the
values nnx's own modules would, and the random stream is left at the same place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax.models.layers import Draws, conv, layer_norm, param_key


def keys_equal(a: jax.Array, b: jax.Array) -> bool:
    return bool(np.array_equal(jax.random.key_data(a), jax.random.key_data(b)))


def test_param_key_draws_the_keys_of_rngs_params_in_order():
    ours, theirs = nnx.Rngs(5), nnx.Rngs(5)
    for _ in range(4):
        assert keys_equal(param_key(ours), theirs.params())
    assert int(ours.params.count[...]) == int(theirs.params.count[...]) == 4


def test_layer_norm_and_conv_take_the_keys_and_leave_the_stream_as_nnx_does():
    ours, theirs = nnx.Rngs(1), nnx.Rngs(1)
    norm = layer_norm(8, 1e-6, dtype=jnp.float32, rngs=ours)
    reference_norm = nnx.LayerNorm(8, epsilon=1e-6, rngs=theirs)
    np.testing.assert_array_equal(norm.scale[...], reference_norm.scale[...])
    kernel = conv(3, 8, 4, dtype=jnp.float32, rngs=ours)
    reference = nnx.Conv(3, 8, kernel_size=(4, 4), kernel_init=nnx.initializers.normal(0.02), rngs=theirs)
    np.testing.assert_array_equal(kernel.kernel[...], reference.kernel[...])  # a real draw, not ones or zeros
    assert keys_equal(param_key(ours), theirs.params())


def test_draws_refuse_a_module_that_asks_for_more_keys_than_counted():
    draws = Draws(nnx.Rngs(0), 1)
    draws.params()
    with pytest.raises(StopIteration):
        draws.params()


def test_tracing_the_default_model_makes_no_slow_count_updates(monkeypatch):
    """`nnx.eval_shape` of ViT-B's ContextBLIP never asks a tracer for its sharding (each ask searches the whole
    traced program: 23 of 27 s when every parameter's draw asked)."""
    from contextblip_jax.models.config import ContextBLIPConfig
    from contextblip_jax.models.contextblip import ContextBLIP

    asked = []
    original = jax._src.core.Tracer.sharding

    def counting(self):
        asked.append(1)
        return original.fget(self)

    monkeypatch.setattr(jax._src.core.Tracer, "sharding", property(counting))
    nnx.eval_shape(lambda: ContextBLIP(ContextBLIPConfig(), rngs=nnx.Rngs(0)))
    assert not asked, f"{len(asked)} tracers were asked for their sharding"
