"""Stage heads: the scoring head (2a) and the inter-context encoder over the 10 candidates (2b), as in the authors'
`finetune_notf.py` and `finetune_context.py`.

The encoder sees the 10 L2-normalised multimodal vectors of one description at once, so each candidate's score
can depend on the others. A learned position embedding is added only for video sets (frames are in temporal
order); static sets get none, which keeps the encoder permutation-equivariant on them.

Both compute in float32 at full matmul precision whatever the model's compute dtype: the candidates of a video
set are near-identical frames, and bfloat16 logits (spacing 0.016 to 0.03 between 2 and 8) tie or reorder them.
The authors' head is a float32 `nn.Linear` on float32 features. The encoder is a few layers over 10 tokens per
description, a negligible cost beside the towers.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax.models.config import ContextConfig, TextConfig
from contextblip_jax.models.layers import DEFAULT_INIT, float32_head, sharded_param
from contextblip_jax.models.text import TextLayer


class ScoringHead(nnx.Module):
    """Linear(width -> 1) on an L2-normalised multimodal vector: one logit per candidate.

    With `logit_scale` s > 0 the logits are multiplied by `exp(log_scale)`, a learned scalar starting at log(s)
    (see `HeadConfig`); s = 0 is the authors' head, with no such parameter. Float32 whatever its input's dtype.
    """

    def __init__(self, width: int, *, logit_scale: float = 0.0, rngs: nnx.Rngs):
        self.proj = float32_head(width, 1, rngs=rngs)
        self.log_scale = (
            sharded_param(rngs, nnx.initializers.constant(math.log(logit_scale)), (), ()) if logit_scale else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = self.proj(x)[..., 0]
        return logits if self.log_scale is None else logits * jnp.exp(self.log_scale[...])


class InterContextEncoder(nnx.Module):
    """Post-LN BERT layers over the candidates, all in float32 (see the module docstring)."""

    def __init__(self, config: ContextConfig, width: int, *, rngs: nnx.Rngs):
        layer_config = TextConfig(width=width, depth=config.depth, num_heads=config.num_heads, mlp_dim=config.mlp_dim)
        self.position = sharded_param(rngs, DEFAULT_INIT, (config.num_candidates, width), (None, "embed"))
        self.layers = nnx.List(
            [
                TextLayer(layer_config, cross_attention=False, dropout=config.dropout, dtype=jnp.float32, rngs=rngs)
                for _ in range(config.depth)
            ]
        )

    def __call__(self, x: jax.Array, is_video: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """x [B, candidates, D] (normalised), is_video [B] -> `encoder(x + pos·is_video) + x`, float32 of the same
        shape. Fewer candidates than positions (MMVP-VLM's pairs) use the first positions."""
        x = x.astype(jnp.float32)
        h = x + self.position[...][None, : x.shape[1]] * is_video.astype(jnp.float32)[:, None, None]
        with jax.default_matmul_precision("highest"):
            for layer in self.layers:
                h, _ = layer(h, None, rngs=rngs)
        return h + x
