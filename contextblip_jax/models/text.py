"""BLIP's text encoder: BERT (post-LN) whose layers cross-attend to image tokens when they are given.

Without image tokens it is the unimodal text encoder (ITC); with them it is the multimodal encoder (ITM).
The cross-attention keys and values take the vision width (1024 for ViT-L), which may differ from the text
width. Each layer's cross-attention probabilities are returned for TMIM's text-guided mask.

Dropout sits where BERT has it (the authors' `models/med.py`): after the embeddings' LayerNorm, on the attention
probabilities, and on each sub-layer's output before its residual LayerNorm. Its rate is built as 0 and set on a
built model (`contextblip.set_dropout`); it runs only on calls that pass `rngs`.

The hidden states entering and leaving each layer are constrained to logical axes (batch, length, embed), as
maxtext constrains its layers': on a mesh (`jax.set_mesh`) they stay split over the batch axes (data × fsdp)
between layers; without one it is a no-op (`with_logical_constraint`).

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax.models.axes import with_logical_constraint
from contextblip_jax.models.config import TextConfig
from contextblip_jax.models.layers import DEFAULT_INIT, Dense, Draws, MultiHeadAttention, activation, layer_norm
from contextblip_jax.models.stack import run_blocks


@dataclasses.dataclass(frozen=True)
class TextOutput:
    """`cross_attention[i]`: layer i's cross-attention probabilities [B, heads, T, image tokens] (empty
    when no image tokens were given)."""

    last_hidden_state: jax.Array
    cross_attention: tuple[jax.Array, ...]


jax.tree_util.register_dataclass(TextOutput, data_fields=["last_hidden_state", "cross_attention"], meta_fields=[])


def set_dropout_rate(module: nnx.Module, rate: float) -> None:
    """Sets every `nnx.Dropout` under `module` to `rate`: dropout has no parameters, so its rate is a runtime
    choice made on a built model (`contextblip.set_dropout`)."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate {rate} must lie in [0, 1)")
    for dropout in [node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Dropout)]:
        dropout.rate = float(rate)


class TextEmbeddings(nnx.Module):
    """Word + absolute position embeddings, then LayerNorm and dropout; BLIP uses no token-type embeddings."""

    def __init__(self, config: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        self.word = nnx.Embed(
            config.vocab_size,
            config.width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(DEFAULT_INIT, ("vocab", "embed"), eager_sharding=False),
            rngs=Draws(rngs, 1),  # type: ignore[arg-type]
        )
        self.position = nnx.Embed(
            config.max_positions,
            config.width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(DEFAULT_INIT, (None, "embed"), eager_sharding=False),
            rngs=Draws(rngs, 1),  # type: ignore[arg-type]
        )
        self.norm = layer_norm(config.width, config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(0.0)

    def __call__(self, input_ids: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"text length {length} exceeds the {self.config.max_positions} position embeddings")
        x = self.norm(self.word(input_ids) + self.position(jnp.arange(length))[None])
        return self.dropout(x, deterministic=rngs is None, rngs=rngs)


class TextLayer(nnx.Module):
    """Self-attention, optional cross-attention, feed-forward; each followed by residual + LayerNorm (BERT).

    `cross_attention=False` builds a plain BERT layer (the inter-context encoder); `dropout` is BERT's hidden and
    attention dropout, active only when the call passes `rngs`.
    """

    def __init__(
        self,
        config: TextConfig,
        *,
        cross_attention: bool = True,
        dropout: float = 0.0,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        d, eps = config.width, config.layer_norm_eps
        self.self_attn = MultiHeadAttention(d, config.num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
        self.self_norm = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.cross_attn = (
            MultiHeadAttention(
                d, config.num_heads, kv_width=config.encoder_width, dropout=dropout, dtype=dtype, rngs=rngs
            )
            if cross_attention
            else None
        )
        self.cross_norm = layer_norm(d, eps, dtype=dtype, rngs=rngs) if cross_attention else None
        self.fc1 = Dense((d,), (config.mlp_dim,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense((config.mlp_dim,), (d,), ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.mlp_norm = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.activation = config.activation

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        image_tokens: jax.Array | None = None,
        image_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        image_rows: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        def drop(y: jax.Array) -> jax.Array:
            return self.dropout(y, deterministic=rngs is None, rngs=rngs)

        x = self.self_norm(x + drop(self.self_attn(x, key_mask=mask, rngs=rngs)[0]))
        probs = None
        if image_tokens is not None:
            if self.cross_attn is None:
                raise ValueError("this layer was built without cross-attention")
            attended, probs = self.cross_attn(x, image_tokens, image_mask, rngs, context_rows=image_rows)
            x = self.cross_norm(x + drop(attended))
        x = self.mlp_norm(x + drop(self.fc2(activation(self.activation)(self.fc1(x)))))
        return x, probs


class TextEncoder(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.embeddings = TextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([TextLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.depth)])
        # recompute each layer in the backward pass, keeping what this `jax.checkpoint` policy saves (None: off);
        # set on a built model by `contextblip.set_remat`
        self.remat_policy: Callable[..., bool] | None = None
        self.scan = False  # run the layers as one scanned body (`stack.run_blocks`); `contextblip.set_scan`

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        image_tokens: jax.Array | None = None,
        image_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        image_rows: jax.Array | None = None,
    ) -> TextOutput:
        """`input_ids`, `attention_mask` [B, T] (mask 1 for real tokens); `image_tokens` [B, N, vision width].

        With `image_rows` [G, B / G], `image_tokens` and `image_mask` hold one row per distinct image and text row
        i cross-attends to the image `layers.gather_rows` picks for it: every layer projects an image's keys and
        values once, however many texts read them.

        `input_ids` are used as given: whether the first token is `[CLS]` or `[ENC]` is the tokenizer's choice.
        `rngs` switches dropout on (training); without it the encoder is deterministic.
        """
        x = _constrain(self.embeddings(input_ids, rngs))

        def apply(layer: TextLayer, x: jax.Array, rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array | None]:
            x, probs = layer(x, attention_mask, image_tokens, image_mask, rngs, image_rows)
            return _constrain(x), probs

        x, maps = run_blocks(self.layers, x, apply, remat_policy=self.remat_policy, scan=self.scan, rngs=rngs)
        return TextOutput(last_hidden_state=x, cross_attention=tuple(m for m in maps if m is not None))


def _constrain(x: jax.Array) -> jax.Array:
    """Hidden states [B, T, D] between layers: split over the batch on a mesh (module docstring)."""
    return with_logical_constraint(x, ("batch", "length", "embed"))
