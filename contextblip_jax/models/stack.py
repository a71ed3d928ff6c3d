"""Runs a tower's identical blocks one after another: unrolled (one copy of the block per layer in the compiled
program), or as one `jax.lax.scan` over the blocks' stacked parameters (one copy of the block, whatever the depth).

Scanning is a compile-time and program-size choice: XLA compiles the block once instead of once per layer
(docs/compile-and-fit.md, "Layer scan and compile time"). The parameters stay stored per
block (`blocks.0.…`, `blocks.1.…`), so checkpoints, converted weights, sharding rules and trainable-parameter
patterns are the same either way; the scan stacks them inside the step, which costs one extra copy of the
tower's parameters (and of their gradients) per call. The two orders compute the same function: without dropout
the outputs match within float rounding. With dropout, scanned blocks draw their masks from one key per block
split from one draw of the call's stream, so the masks differ from the unrolled ones (same rate, same independence).

    x, per_block = run_blocks(self.blocks, x, body, remat_policy=..., scan=True, rngs=rngs)

`body(block, x, rngs) -> (x, y)`: `y` (any pytree, or None) is collected per block, in order.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Body = Callable[[nnx.Module, jax.Array, nnx.Rngs | None], tuple[jax.Array, Any]]


def run_blocks(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    body: Body,
    *,
    remat_policy: Callable[..., bool] | None,
    scan: bool,
    rngs: nnx.Rngs | None = None,
) -> tuple[jax.Array, tuple[Any, ...]]:
    """`x` through every block of `blocks` with `body`; returns the last `x` and each block's `y`.

    `remat_policy` (a `jax.checkpoint` policy, None: off) recomputes each block in the backward pass keeping what
    it names; `scan` runs the blocks as one scanned body (module docstring).
    """
    if not scan:
        apply = body if remat_policy is None else nnx.remat(body, policy=remat_policy)
        outputs = []
        for block in blocks:
            x, y = apply(block, x, rngs)
            outputs.append(y)
        return x, tuple(outputs)
    graphdef, stacked = _stacked(blocks)
    keys = jax.random.split(rngs.dropout(), len(blocks)) if rngs is not None and _drops(blocks[0]) else None

    def step(carry: jax.Array, inputs: tuple[nnx.State, jax.Array | None]) -> tuple[jax.Array, Any]:
        state, key = inputs
        return body(nnx.merge(graphdef, state), carry, None if key is None else nnx.Rngs(dropout=key))

    if remat_policy is not None:
        step = jax.checkpoint(step, policy=remat_policy)
    x, ys = jax.lax.scan(step, x, (stacked, keys))
    return x, tuple(jax.tree.map(lambda y, i=i: y[i], ys) for i in range(len(blocks)))


def _drops(block: nnx.Module) -> bool:
    """Whether `block` draws dropout masks at all: at rate 0 the scan draws no keys, as the unrolled blocks draw
    none, so the call's random stream is left as it was."""
    return any(isinstance(node, nnx.Dropout) and node.rate > 0 for _, node in nnx.iter_graph(block))


def _stacked(blocks: Sequence[nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """The blocks' shared structure and their states stacked along a new leading axis; blocks built differently
    (another width, a cross-attention one lacks, another runtime setting) cannot share one scanned body."""
    graphdefs, states = zip(*(nnx.split(block) for block in blocks), strict=True)
    if any(graphdef != graphdefs[0] for graphdef in graphdefs[1:]):
        raise ValueError("scan needs identical blocks: these differ in structure or runtime settings")
    return graphdefs[0], jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
