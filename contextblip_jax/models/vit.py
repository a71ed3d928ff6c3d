"""BLIP's vision transformer (ViT-B/16, ViT-L/16) in Flax NNX.

Pre-LN blocks (`x += attn(ln1(x)); x += mlp(ln2(x))`), no LayerNorm before the blocks and one after them.
Every block's output is returned because ContextBLIP's adapter reads blocks 3/6/9/12, and the forward pass is
split into patch embedding, CLS token and the block stack because TMIM runs the blocks on a subset of patches.

The tokens entering and leaving each block are constrained to logical axes (batch, length, embed), as
big_vision's ViT constrains them: on a mesh (`jax.set_mesh`) the hidden states between blocks stay split over
the batch axes (data × fsdp) whatever GSPMD would infer from the parameters around them; without one it is a
no-op (`with_logical_constraint`).

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contextblip_jax.models.axes import with_logical_constraint
from contextblip_jax.models.config import VisionConfig
from contextblip_jax.models.layers import (
    DEFAULT_INIT,
    Dense,
    MultiHeadAttention,
    activation,
    conv,
    layer_norm,
    sharded_param,
)
from contextblip_jax.models.stack import run_blocks


@dataclasses.dataclass(frozen=True)
class VisionOutput:
    """`last_hidden_state` is after the final LayerNorm; `block_outputs[i]` is block i+1's raw output."""

    last_hidden_state: jax.Array
    block_outputs: tuple[jax.Array, ...]


jax.tree_util.register_dataclass(VisionOutput, data_fields=["last_hidden_state", "block_outputs"], meta_fields=[])


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = config.width
        self.norm1 = layer_norm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadAttention(d, config.num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.fc1 = Dense((d,), (config.mlp_dim,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense((config.mlp_dim,), (d,), ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))[0]
        return x + self.fc2(activation(self.activation)(self.fc1(self.norm2(x))))


class VisionTransformer(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.dtype = dtype
        p, d = config.patch_size, config.width
        self.patch_embed = conv(3, d, p, strides=(p, p), padding="VALID", dtype=dtype, rngs=rngs)
        self.cls_token = sharded_param(rngs, DEFAULT_INIT, (1, 1, d), (None, None, "embed"))
        self.pos_embed = sharded_param(rngs, DEFAULT_INIT, (1, config.num_tokens, d), (None, None, "embed"))
        self.blocks = nnx.List([VisionBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.depth)])
        self.norm = layer_norm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        # recompute each block in the backward pass, keeping what this `jax.checkpoint` policy saves (None: off);
        # set on a built model by `contextblip.set_remat`
        self.remat_policy: Callable[..., bool] | None = None
        self.scan = False  # run the blocks as one scanned body (`stack.run_blocks`); `contextblip.set_scan`

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """NHWC images [B, H, W, 3] -> patch tokens with their position embeddings [B, grid², D]."""
        expected = (self.config.image_size, self.config.image_size, 3)
        if images.shape[1:] != expected:
            raise ValueError(f"images have shape {images.shape[1:]}, the vision tower expects {expected} (HWC)")
        x = self.patch_embed(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.pos_embed[:, 1:].astype(self.dtype)

    def cls_tokens(self, batch: int) -> jax.Array:
        """The CLS token with its position embedding, repeated for a batch: [B, 1, D]."""
        cls = (self.cls_token[...] + self.pos_embed[:, :1]).astype(self.dtype)
        return jnp.broadcast_to(cls, (batch, 1, cls.shape[-1]))

    def transform(self, tokens: jax.Array) -> VisionOutput:
        """Runs the blocks and the final LayerNorm on any token sequence (all patches, or CLS + a subset)."""
        x, outputs = run_blocks(
            self.blocks, _constrain(tokens), _apply_block, remat_policy=self.remat_policy, scan=self.scan
        )
        return VisionOutput(last_hidden_state=self.norm(x), block_outputs=outputs)

    def __call__(self, images: jax.Array) -> VisionOutput:
        patches = self.patch_tokens(images)
        tokens = jnp.concatenate([self.cls_tokens(patches.shape[0]), patches], axis=1)
        return self.transform(tokens)


def _apply_block(block: VisionBlock, x: jax.Array, rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
    """One block's output, which is also what the tower returns for it (the adapter reads blocks 3/6/9/12)."""
    x = _constrain(block(x))
    return x, x


def _constrain(x: jax.Array) -> jax.Array:
    """Hidden states [B, tokens, D] between blocks: split over the batch on a mesh (module docstring)."""
    return with_logical_constraint(x, ("batch", "length", "embed"))


def resample_posemb(posemb: np.ndarray, new_grid: int) -> np.ndarray:
    """Resamples ViT position embeddings [1, 1 + g², D] to a `new_grid`² patch grid, keeping the CLS entry.

    Bicubic with PyTorch's kernel (a = -0.75, half-pixel centres, edge clamping, no antialias), which is how
    BLIP and Hugging Face resample between 224 and 384 px; reproducing it keeps converted models exact.
    """
    old_grid = round((posemb.shape[1] - 1) ** 0.5)
    if old_grid**2 + 1 != posemb.shape[1]:
        raise ValueError(f"position embedding with {posemb.shape[1]} entries is not 1 + a square grid")
    if old_grid == new_grid:
        return posemb
    grid = posemb[0, 1:].reshape(old_grid, old_grid, -1).astype(np.float64)
    weights = _bicubic_matrix(old_grid, new_grid)
    resampled = np.einsum("ih,jw,hwd->ijd", weights, weights, grid).reshape(1, new_grid**2, -1)
    return np.concatenate([posemb[:, :1], resampled.astype(posemb.dtype)], axis=1)


def _bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """The [out, in] matrix of 1-D bicubic interpolation as `torch.nn.functional.interpolate` computes it."""

    def near(t: float) -> float:
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: float) -> float:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = (i + 0.5) * in_size / out_size - 0.5
        left = int(np.floor(source))
        t = source - left
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=False):
            matrix[i, min(max(left + offset, 0), in_size - 1)] += weight
    return matrix
