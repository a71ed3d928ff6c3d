"""ContextBLIP's multi-level ("multi-scale") adapter, as in the authors' `models/multiscale_adapter.py`.

It sits beside the ViT: the ViT runs unchanged, and the adapter adds a residual to all its final tokens (CLS
too), computed from the hidden states of a few blocks (3, 6, 9, 12 for ViT-B), each through the ViT's final
LayerNorm: `out = x + ReLU(concat_k ReLU(LN(h_k) W_down_k) W_up)`, no biases, no LayerNorm, no scale.

The optional depthwise-convolution branch (off by default; the authors' code has none) covers the reading of
the paper as "multi-scale convolutions": convolutions over the patch grid at a few kernel sizes, added to the
same residual. It works on any subset of patches (TMIM's visible ones) by scattering them onto the grid.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax.models.config import AdapterConfig
from contextblip_jax.models.layers import Dense, conv


class MultiLevelAdapter(nnx.Module):
    def __init__(self, config: AdapterConfig, width: int, depth: int, grid: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden = width // config.reduction
        self.levels = config.resolved_levels(depth)
        self.grid = grid
        self.enabled = config.enabled
        self.down = nnx.List(
            [Dense((width,), (hidden,), ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs) for _ in self.levels]
        )
        self.up = Dense(
            (hidden * len(self.levels),), (width,), ("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs
        )
        self.convs = nnx.List(
            [
                conv(width, width, k, feature_group_count=width, padding="SAME", dtype=dtype, rngs=rngs)
                for k in config.conv_kernels
            ]
        )

    def __call__(
        self,
        final_tokens: jax.Array,
        block_outputs: Sequence[jax.Array],
        norm: Callable[[jax.Array], jax.Array],
        patch_index: jax.Array | None = None,
    ) -> jax.Array:
        """Adapted tokens [B, 1 + N, D] from the ViT's final tokens and raw block outputs (CLS first).

        `norm` is the ViT's final LayerNorm; `patch_index` [B, N] gives each patch token's grid position when
        the tokens are a subset of the grid (TMIM), and defaults to all positions in order. Switched off
        (`AdapterConfig.enabled`), the final tokens themselves.
        """
        if not self.enabled:
            return final_tokens
        latent = jnp.concatenate(
            [
                jax.nn.relu(down(norm(block_outputs[level - 1])))
                for down, level in zip(self.down, self.levels, strict=True)
            ],
            axis=-1,
        )
        residual = jax.nn.relu(self.up(latent))
        if len(self.convs):
            residual = residual + self._conv_branch(final_tokens, patch_index)
        return final_tokens + residual.astype(final_tokens.dtype)

    def _conv_branch(self, tokens: jax.Array, patch_index: jax.Array | None) -> jax.Array:
        batch, count, width = tokens.shape
        if patch_index is None:
            patch_index = jnp.broadcast_to(jnp.arange(count - 1), (batch, count - 1))
        rows = jnp.arange(batch)[:, None]
        grid = jnp.zeros((batch, self.grid * self.grid, width), tokens.dtype).at[rows, patch_index].set(tokens[:, 1:])
        grid = grid.reshape(batch, self.grid, self.grid, width)
        mixed = sum(conv(grid) for conv in self.convs).reshape(batch, -1, width)
        patches = jnp.take_along_axis(mixed, patch_index[..., None], axis=1)
        return jnp.concatenate([jnp.zeros((batch, 1, width), patches.dtype), patches], axis=1)
