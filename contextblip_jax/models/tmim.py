"""Text-guided masked image modelling (TMIM), as in the authors' `models/multiscale_adapter.py`.

The mask comes from the ITM pass's cross-attention: averaged over layers and heads, gradient stopped, image
CLS dropped; one random real text token per example (or the authors' one position per batch, see
`choose_text_positions`); its row over the patches L2-normalised plus U(0,1)·noise;
the top `mask_rate` of patches are masked. Because that attention is computed on adapter-modified tokens, the
mask moves as the adapter learns. The frozen ViT then encodes CLS + visible patches only (at their original
positions), the same adapter adapts them, and a BERT-style decoder cross-attending to the text reconstructs the
normalised pixels of the masked patches. Shapes are static: every example masks the same number of patches.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax.models.config import TextConfig, TMIMConfig
from contextblip_jax.models.layers import DEFAULT_INIT, Dense, sharded_param
from contextblip_jax.models.text import TextLayer


@dataclasses.dataclass(frozen=True)
class PatchMask:
    """`masked` [B, k] and `visible` [B, N - k] patch indices (each sorted ascending)."""

    masked: jax.Array
    visible: jax.Array


jax.tree_util.register_dataclass(PatchMask, data_fields=["masked", "visible"], meta_fields=[])


def num_masked(num_patches: int, mask_rate: float) -> int:
    return int(mask_rate * num_patches)


def mean_cross_attention(cross_attention: Sequence[jax.Array]) -> jax.Array:
    """[B, heads, T, 1 + N] per layer -> [B, T, N]: mean over layers then heads, no gradient, CLS column dropped."""
    stacked = jnp.stack(cross_attention, axis=1).astype(jnp.float32)
    return jax.lax.stop_gradient(stacked.mean(axis=(1, 2)))[..., 1:]


TEXT_TOKENS = ("example", "batch")
"""How the guiding text token is drawn: see `choose_text_positions`."""


def choose_text_positions(key: jax.Array, attention_mask: jax.Array, token: str = "example") -> jax.Array:
    """The text position whose cross-attention row guides each example's mask: [B].

    "example": one uniformly random real (non-padding) token per example, the project's default. "batch": the
    authors' (`mask.py`, `mask_image`: `random.randint(0, avg_attention_map.shape[1] - 1)`), one position in
    0..T-1 shared by the whole batch, T being the padded length (30 there). For every caption shorter than the
    drawn position it lands on padding: padded queries still attend to the image (only padded keys are masked),
    so the mask follows a padding row, a blend of the whole caption rather than one of its tokens, and how often
    depends on caption length. The default draws within each caption's real tokens so that every mask follows a
    token of its own caption. Under jit the batch is the global (micro-)batch, where the authors draw once per
    GPU.
    """
    if token not in TEXT_TOKENS:
        raise ValueError(f"TMIM text token {token!r} unknown; choose from {TEXT_TOKENS}")
    if token == "batch":
        position = jax.random.randint(key, (), 0, attention_mask.shape[1])
        return jnp.full(attention_mask.shape[:1], position)
    scores = jax.random.uniform(key, attention_mask.shape)
    return jnp.argmax(jnp.where(attention_mask.astype(bool), scores, -1.0), axis=-1)


def split_patches(scores: jax.Array, count: int) -> PatchMask:
    """The `count` highest-scoring patches are masked, the rest visible (ties broken by index)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return PatchMask(masked=jnp.sort(order[:, :count], axis=-1), visible=jnp.sort(order[:, count:], axis=-1))


def text_guided_mask(
    key: jax.Array, attention: jax.Array, attention_mask: jax.Array, config: TMIMConfig, token: str = "example"
) -> PatchMask:
    """Chooses the patches to mask from the mean cross-attention map `attention` [B, T, N]; `token`: how the
    guiding text position is drawn (`choose_text_positions`)."""
    position_key, noise_key = jax.random.split(key)
    count = num_masked(attention.shape[-1], config.mask_rate)
    if config.random_mask:
        return split_patches(jax.random.uniform(noise_key, (attention.shape[0], attention.shape[2])), count)
    positions = choose_text_positions(position_key, attention_mask, token)
    rows = jnp.take_along_axis(attention, positions[:, None, None], axis=1)[:, 0]
    rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    rows = rows + jax.random.uniform(noise_key, rows.shape) * config.noise
    return split_patches(rows, count)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch·patch·C], flattened (ph, pw, c): TMIM's pixel targets, row-major patches."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def gather_patches(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, N, ...] at per-example indices [B, k] -> [B, k, ...]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


class TextAdapter(nnx.Module):
    """Residual text adapter on the ITM-pass text features: Linear, ReLU, Linear, ReLU, no biases."""

    def __init__(self, width: int, reduction: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden = width // reduction
        self.fc1 = Dense((width,), (hidden,), ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.fc2 = Dense((hidden,), (width,), ("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x))))


class TMIMDecoder(nnx.Module):
    """Mask token + decoder positions, 4 post-LN BERT layers cross-attending to text, a pixel head."""

    def __init__(
        self,
        config: TMIMConfig,
        *,
        width: int,
        text_width: int,
        num_tokens: int,
        pixels: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        layer_config = TextConfig(
            width=width,
            depth=config.decoder_depth,
            num_heads=config.decoder_heads,
            mlp_dim=config.decoder_mlp_dim,
            encoder_width=text_width,
        )
        self.mask_token = sharded_param(rngs, DEFAULT_INIT, (width,), ("embed",))
        self.position = sharded_param(rngs, DEFAULT_INIT, (num_tokens, width), (None, "embed"))
        self.text_adapter = TextAdapter(text_width, config.text_adapter_reduction, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([TextLayer(layer_config, dtype=dtype, rngs=rngs) for _ in range(config.decoder_depth)])
        self.head = Dense((width,), (pixels,), ("embed", None), dtype=dtype, rngs=rngs)

    def __call__(
        self,
        encoded: jax.Array,
        mask: PatchMask,
        text: jax.Array,
        text_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Predicted pixels of the masked patches [B, k, pixels].

        `encoded` [B, 1 + visible, D] is CLS + adapted visible tokens; masked positions get the mask token plus
        their decoder position (indexed by patch index, as the authors do); all tokens return to grid order.
        `rngs` switches on the layers' BERT dropout (its rate is set by `contextblip.set_dropout`); the authors'
        decoder takes its input as `encoder_embeds`, past BERT's embedding dropout, so the input is not dropped.
        """
        masked = (self.mask_token[...] + self.position[...][mask.masked]).astype(encoded.dtype)
        tokens = jnp.concatenate([encoded[:, 1:], masked], axis=1)
        order = jnp.argsort(jnp.concatenate([mask.visible, mask.masked], axis=1), axis=1)
        x = jnp.concatenate([encoded[:, :1], gather_patches(tokens, order)], axis=1)
        text = self.text_adapter(text)
        for layer in self.layers:
            x, _ = layer(x, None, text, text_mask, rngs)
        at_masked = gather_patches(x[:, 1:], mask.masked)
        return self.head(at_masked).astype(jnp.float32)
