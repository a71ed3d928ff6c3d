"""The machine facts the benchmark and `--compile_only` report: FLOP counts of a program, peaks, spreads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.compile import hardware


def test_program_flops_counts_a_matrix_product_from_abstract_and_sharded_arguments():
    """2·M·K·N for one product, whether the arguments are arrays, shape-only values or sharded over devices
    (the count is of the whole, unpartitioned program)."""
    a, b = np.ones((64, 128), np.float32), np.ones((128, 32), np.float32)
    expected = 2 * 64 * 128 * 32
    assert hardware.program_flops(jnp.matmul, jnp.asarray(a), jnp.asarray(b)) == expected
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (a, b)]
    assert hardware.program_flops(jnp.matmul, *shapes) == expected
    mesh = jax.make_mesh((1,), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert hardware.program_flops(jnp.matmul, jax.device_put(a, rows), b) == expected
    assert hardware.program_flops(lambda x, y: jnp.matmul(x, y) @ y.T, a, b) == expected + 2 * 64 * 32 * 128


def test_spread_is_median_min_max():
    assert hardware.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
