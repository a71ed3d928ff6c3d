"""BlipRetrieval: the two towers plus BLIP's retrieval heads (ITM head, ITC projections).

Images are float32 NHWC, already resized and normalised (see `data/preprocess.py`). Token ids are used
exactly as given.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax.models.config import BlipConfig
from contextblip_jax.models.layers import Dense, float32_head
from contextblip_jax.models.text import TextEncoder, TextOutput
from contextblip_jax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` along the last axis, in float32 (as torch's `F.normalize`)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class BlipRetrieval(nnx.Module):
    def __init__(self, config: BlipConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.vision = VisionTransformer(config.vision, dtype=dtype, rngs=rngs)
        self.text = TextEncoder(config.text, dtype=dtype, rngs=rngs)
        vw, tw = config.vision.width, config.text.width
        self.vision_proj = Dense((vw,), (config.embed_dim,), ("embed", None), dtype=dtype, rngs=rngs)
        self.text_proj = Dense((tw,), (config.embed_dim,), ("embed", None), dtype=dtype, rngs=rngs)
        self.itm_head = float32_head(tw, 2, rngs=rngs)  # zero-shot ranks candidates by its logits

    def image_features(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> the vision tower's final tokens [B, tokens, vision width] (CLS first)."""
        return self.vision(images).last_hidden_state

    def multimodal(
        self,
        image_tokens: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        image_rows: jax.Array | None = None,
    ) -> TextOutput:
        """The text encoder cross-attending to `image_tokens` (all visible): BLIP's ITM pass. `rngs`: dropout.
        `image_rows`: which image row each text reads, when texts share images (`TextEncoder`)."""
        image_mask = jnp.ones(image_tokens.shape[:2], dtype=bool)
        return self.text(input_ids, attention_mask, image_tokens, image_mask, rngs=rngs, image_rows=image_rows)

    def itm_logits_from_features(
        self,
        image_tokens: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        first = self.multimodal(image_tokens, input_ids, attention_mask, rngs).last_hidden_state[:, 0]
        return self.itm_head(first).astype(jnp.float32)

    def itm_logits(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B, 2] image-text matching logits (class 1 = match); row i pairs image i with text i."""
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"itm_logits pairs row i with row i: got {images.shape[0]} images and {input_ids.shape[0]} texts"
            )
        return self.itm_logits_from_features(self.image_features(images), input_ids, attention_mask)

    def image_embedding(self, image_tokens: jax.Array) -> jax.Array:
        """L2-normalised ITC embedding of the image CLS token [B, embed_dim]."""
        return l2_normalize(self.vision_proj(image_tokens[:, 0]))

    def text_embedding(
        self, input_ids: jax.Array, attention_mask: jax.Array, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """L2-normalised ITC embedding of the unimodal text encoder's first token [B, embed_dim]. `rngs`: dropout."""
        hidden = self.text(input_ids, attention_mask, rngs=rngs).last_hidden_state
        return l2_normalize(self.text_proj(hidden[:, 0]))

    def itc_similarity(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B_img, B_txt] cosine similarities between every image and every text (no temperature)."""
        image = self.image_embedding(self.image_features(images))
        return image @ self.text_embedding(input_ids, attention_mask).T
