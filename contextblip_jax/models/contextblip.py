"""ContextBLIP: BLIP + multi-level adapter + TMIM + scoring head + inter-context encoder, one method per stage.

| stage (paper)       | method              |
|---------------------|---------------------|
| 1, pre-training     | `pretrain_losses`   |
| zero-shot IRCD      | `zero_shot_scores`  |
| 2a, fine-tuning     | `finetune_logits`   |
| 2b, inter-context   | `context_logits`    |

Which parameters train in a stage is data, not code: `stages.py` holds each stage's pattern over dotted parameter
paths and `trainable_filter(pattern)` turns it into an NNX filter, so no stage needs code of its own to freeze
anything.

Imports: its own package (`models`), `losses`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax import losses
from contextblip_jax.models.adapter import MultiLevelAdapter
from contextblip_jax.models.blip import BlipRetrieval, l2_normalize
from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.context import InterContextEncoder, ScoringHead
from contextblip_jax.models.layers import ATTENTION_IMPLEMENTATIONS, Dense, dotted_path, redraw_fan_in, redraw_torch
from contextblip_jax.models.text import TextOutput, set_dropout_rate
from contextblip_jax.models.tmim import (
    TMIMDecoder,
    gather_patches,
    mean_cross_attention,
    patchify,
    text_guided_mask,
)


def trainable_filter(pattern: str) -> nnx.filterlib.Filter:
    """Parameters whose dotted path matches `pattern` (e.g. `^context\\.`)."""
    compiled = re.compile(pattern)
    return nnx.All(nnx.Param, lambda path, _: bool(compiled.search(dotted_path(path))))


REMAT_TOWERS = ("vision", "text")

REMAT_POLICIES: dict[str, Callable[..., bool]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}
"""What a recomputed block keeps from its forward pass besides its input (`jax.checkpoint` policies).

`full`: nothing; the backward pass runs the whole block again (least memory). `dots_no_batch`: the outputs of
its weight products (attention's projections, the MLP's layers) that the backward pass reads, the dot products
without batch dimensions; LayerNorms, activations, softmax and attention's two batched products are recomputed,
and those are a small part of a block's FLOPs (at ViT-B's 197 tokens, about 4%). `dots`: also attention's batched
products, its float32 scores [B, heads, T, T] and probabilities·values, so only elementwise work is recomputed
at the cost of the score matrices (the `cudnn` attention kernel is no dot product: recomputed whatever the
policy)."""


def check_runtime(
    remat: tuple[str, ...] = (),
    remat_policy: str = "full",
    attention: str = "einsum",
    dtype: str | None = None,
    text_dropout: float = 0.0,
    tmim_dropout: float = 0.0,
) -> None:
    """The runtime switches' allowed values, in one place: the setters below check their arguments here, and a run
    config is checked here before any model is built (`runconfig.checks`). `dtype`, when given, is the compute
    dtype the attention will run in."""
    unknown = sorted(set(remat) - set(REMAT_TOWERS))
    if unknown:
        raise ValueError(f"remat towers {unknown} unknown; choose from {REMAT_TOWERS}")
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} unknown; choose from {tuple(REMAT_POLICIES)}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention {attention!r} unknown; choose from {ATTENTION_IMPLEMENTATIONS}")
    if attention == "cudnn" and dtype is not None and dtype not in ("bfloat16", "float16"):
        raise ValueError(f"attention 'cudnn' needs dtype bfloat16 or float16, not {dtype}")
    for name, rate in (("text", text_dropout), ("tmim", tmim_dropout)):
        if not 0 <= rate < 1:
            raise ValueError(f"{name} dropout {rate} must lie in [0, 1)")


def set_remat(model: ContextBLIP, towers: list[str] | tuple[str, ...], policy: str = "full") -> None:
    """Rematerialise the blocks of the named towers (`vision`, `text`) in the backward pass, keeping what
    `policy` (`REMAT_POLICIES`) names: a runtime choice, like the compute dtype, so it is set on a built model
    rather than in its config."""
    check_runtime(remat=tuple(towers), remat_policy=policy)
    model.blip.vision.remat_policy = REMAT_POLICIES[policy] if "vision" in towers else None
    model.blip.text.remat_policy = REMAT_POLICIES[policy] if "text" in towers else None


def set_scan(model: ContextBLIP, scan: bool) -> None:
    """Runs both towers' blocks (vision blocks, text layers) as one scanned body each instead of unrolled
    (`stack.run_blocks`): the same function and the same stored parameters, compiled once per tower rather than
    once per block. A runtime choice like remat, set on a built model."""
    model.blip.vision.scan = bool(scan)
    model.blip.text.scan = bool(scan)


def set_attention(model: ContextBLIP, implementation: str) -> None:
    """Computes the self-attention of both towers with `implementation` (`layers.ATTENTION_IMPLEMENTATIONS`).

    Cross-attention keeps the explicit product: TMIM chooses its mask from the cross-attention probabilities.
    Like remat, a runtime choice with the same parameters, so it is set on a built model.
    """
    check_runtime(attention=implementation)
    for block in model.blip.vision.blocks:
        block.attn.implementation = implementation
    for layer in model.blip.text.layers:
        layer.self_attn.implementation = implementation


def set_dropout(model: ContextBLIP, text: float, tmim: float) -> None:
    """BERT's dropout rate in BLIP's text encoder (`text`: embeddings, attention probabilities, hidden states) and
    in the TMIM decoder's layers (`tmim`); the authors train with 0.1 for both (`configs/bert_config.json`).

    A runtime choice like remat, set on a built model: it has no parameters, and runs only on the calls given
    `rngs` (the training losses), never at evaluation. At rate 0 no dropout draws anything, whatever the rngs.
    The inter-context encoder keeps its own rate (`ContextConfig.dropout`).
    """
    check_runtime(text_dropout=text, tmim_dropout=tmim)
    set_dropout_rate(model.blip.text, text)
    set_dropout_rate(model.tmim.layers, tmim)


class ContextBLIP(nnx.Module):
    def __init__(self, config: ContextBLIPConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        vision, text = config.blip.vision, config.blip.text
        self.blip = BlipRetrieval(config.blip, dtype=dtype, rngs=rngs)
        self.adapter = MultiLevelAdapter(
            config.adapter, vision.width, vision.depth, vision.grid, dtype=dtype, rngs=rngs
        )
        self.tmim = TMIMDecoder(
            config.tmim,
            width=vision.width,
            text_width=text.width,
            num_tokens=vision.num_tokens,
            pixels=vision.patch_size**2 * 3,
            dtype=dtype,
            rngs=rngs,
        )
        self.mask_head = (
            Dense((vision.width,), (1,), ("embed", None), dtype=dtype, rngs=rngs)
            if config.tmim.mask_prediction
            else None
        )
        self.head = ScoringHead(text.width, logit_scale=config.head.logit_scale, rngs=rngs)  # float32
        self.context = InterContextEncoder(config.context, text.width, rngs=rngs)  # float32
        if config.init == "fan_in":
            redraw_fan_in(self, rngs)
        elif config.init == "torch":  # the parts the authors create fresh, as they create them (ContextBLIPConfig)
            linear = [self.adapter, self.tmim.text_adapter, self.tmim.head, self.mask_head, self.head]
            tables = [self.tmim.mask_token, self.tmim.position, self.context.position]
            redraw_torch([*linear, self.context.layers], tables, rngs)

    # -- shared passes ---------------------------------------------------------------------------------------

    def adapted_features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(adapted tokens, plain BLIP tokens), both [B, tokens, D]."""
        out = self.blip.vision(images)
        adapted = self.adapter(out.last_hidden_state, out.block_outputs, self.blip.vision.norm)
        return adapted, out.last_hidden_state

    def match(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        image_rows: jax.Array | None = None,
    ) -> TextOutput:
        """The ITM pass: text (with `[ENC]` first) cross-attending to the adapted image tokens. `rngs`: the text
        encoder's dropout (`set_dropout`); `image_rows`: which image each text reads when texts share images
        (`TextEncoder`)."""
        return self.blip.multimodal(self.adapted_features(images)[0], input_ids, attention_mask, rngs, image_rows)

    def candidate_match(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        set_index: jax.Array | None = None,
    ) -> TextOutput:
        """The ITM pass of every (description, candidate), one text row per pair: [B · C, T, D] in description
        order, candidates within.

        Without `set_index`, images [B, C, H, W, 3] hold each description's candidates. With it, images
        [S, C, H, W, 3] hold each set once and `set_index` [G, B / G] names the set of each description, counted
        within its group (groups split both S and B into G equal blocks, one per data shard): every image then
        goes through the vision tower, the adapter and each text layer's key/value projections once, and all the
        descriptions of its set read the result. The numbers equal repeating the set per description, up to float
        rounding."""
        count = images.shape[1]
        flat = images.reshape(images.shape[0] * count, *images.shape[2:])
        ids = jnp.repeat(input_ids, count, axis=0)
        mask = jnp.repeat(attention_mask, count, axis=0)
        rows = None
        if set_index is not None:
            groups, per_group = set_index.shape
            if images.shape[0] % groups or input_ids.shape[0] != groups * per_group:
                raise ValueError(
                    f"set_index {set_index.shape} does not split {images.shape[0]} sets and {input_ids.shape[0]} "
                    "descriptions into equal groups"
                )
            candidate = jnp.arange(count, dtype=set_index.dtype)
            rows = (set_index[..., None] * count + candidate).reshape(groups, per_group * count)
        return self.match(flat, ids, mask, rngs, image_rows=rows)

    def _candidates(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        set_index: jax.Array | None = None,
    ) -> jax.Array:
        """ITM first tokens for every (description, candidate) [B, C, D] (`candidate_match`)."""
        first = self.candidate_match(images, input_ids, attention_mask, rngs, set_index).last_hidden_state[:, 0]
        return first.reshape(input_ids.shape[0], images.shape[1], -1)

    def match_probability(self, first: jax.Array) -> jax.Array:
        """The ITM head's match probability of ITM first tokens [..., D] -> [...] (the zero-shot score)."""
        return jax.nn.softmax(self.blip.itm_head(first).astype(jnp.float32), axis=-1)[..., 1]

    def head_logits(self, first: jax.Array) -> jax.Array:
        """The scoring head on L2-normalised ITM first tokens [..., D] -> [...] (stage 2a's score)."""
        return self.head(l2_normalize(first))

    # -- one method per stage --------------------------------------------------------------------------------

    def zero_shot_scores(
        self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, set_index: jax.Array | None = None
    ) -> jax.Array:
        """ITM match probability of every candidate [B, C]; the prediction is its argmax. `set_index`: images are
        given once per set (`_candidates`)."""
        return self.match_probability(self._candidates(images, input_ids, attention_mask, set_index=set_index))

    def finetune_logits(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
        set_index: jax.Array | None = None,
    ) -> jax.Array:
        """Stage 2a: scoring head on the L2-normalised ITM first token, [B, C] logits. `rngs`: dropout.
        `set_index`: images are given once per set (`_candidates`)."""
        return self.head_logits(self._candidates(images, input_ids, attention_mask, rngs, set_index))

    def context_logits(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        is_video: jax.Array,
        rngs: nnx.Rngs | None = None,
        set_index: jax.Array | None = None,
    ) -> jax.Array:
        """Stage 2b: the inter-context encoder over the C normalised vectors, then 2a's head. `rngs`: dropout, in
        the encoder and in the frozen text encoder too (the authors extract 2b's features in train mode).
        `set_index`: images are given once per set (`_candidates`)."""
        first = self._candidates(images, input_ids, attention_mask, rngs, set_index)
        return self.context_logits_from_features(l2_normalize(first), is_video, rngs)

    def candidate_features(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        set_index: jax.Array | None = None,
    ) -> jax.Array:
        """The L2-normalised ITM vectors [B, C, D] that stage 2b reads, dropout off: what its towers give for a
        description, computed once and cached when they are frozen (`training/feature_cache.py`)."""
        return l2_normalize(self._candidates(images, input_ids, attention_mask, set_index=set_index))

    def context_logits_from_features(
        self, features: jax.Array, is_video: jax.Array, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Stage 2b from its input vectors [B, C, D] (`candidate_features`): the inter-context encoder, then 2a's
        head."""
        return self.head(self.context(features, is_video, rngs=rngs))

    def pretrain_losses(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        key: jax.Array,
        temperature: float | None = None,
        *,
        groups: int = 1,
        tmim_token: str = "example",
        rngs: nnx.Rngs | None = None,
    ) -> dict[str, jax.Array]:
        """Stage 1 on image-caption pairs [B, H, W, 3] / [B, T]: ITM with hard negatives, TMIM (and the optional
        mask prediction). `input_ids` carry `[ENC]` first; the ITC pass swaps in `[CLS]`.

        `key` draws the negatives and the TMIM mask; `groups`: negatives come from within each of that many
        consecutive blocks of the batch (`losses.sample_hard_negatives`); `tmim_token`: how TMIM's guiding text
        token is drawn (`tmim.choose_text_positions`); `rngs` switches on the text encoder's and the decoder's
        dropout in every text pass (ITC, both ITM passes) and in the decoder, as the authors train in train mode.
        """
        if images.shape[0] < 2:
            raise ValueError("stage 1 needs at least 2 image-caption pairs per batch to draw hard negatives")
        sample_key, mask_key = jax.random.split(key)
        vision = self.blip.vision(images)
        plain = vision.last_hidden_state
        adapted = self.adapter(plain, vision.block_outputs, self.blip.vision.norm)

        itc_ids = input_ids.at[:, 0].set(self.config.cls_token_id)
        similarity = self.blip.image_embedding(plain) @ self.blip.text_embedding(itc_ids, attention_mask, rngs).T
        negative_image, negative_text = losses.sample_hard_negatives(
            sample_key, jax.lax.stop_gradient(similarity), temperature, groups
        )
        positive = self.blip.multimodal(adapted, input_ids, attention_mask, rngs)
        negative_logits = self.blip.itm_logits_from_features(
            jnp.concatenate([adapted[negative_image], adapted]),
            jnp.concatenate([input_ids, input_ids[negative_text]]),
            jnp.concatenate([attention_mask, attention_mask[negative_text]]),
            rngs,
        )
        result = {
            "itm": losses.itm_loss(self.blip.itm_head(positive.last_hidden_state[:, 0]), negative_logits),
        }

        mask = text_guided_mask(
            mask_key, mean_cross_attention(positive.cross_attention), attention_mask, self.config.tmim, tmim_token
        )
        predicted = self.tmim(
            self.encode_visible(images, mask.visible), mask, positive.last_hidden_state, attention_mask, rngs
        )
        target = gather_patches(patchify(images, self.config.blip.vision.patch_size), mask.masked)
        result["tmim"] = losses.tmim_loss(predicted, target)
        if self.mask_head is not None:
            is_masked = jnp.zeros((plain.shape[0], plain.shape[1] - 1), jnp.float32)
            is_masked = is_masked.at[jnp.arange(plain.shape[0])[:, None], mask.masked].set(1.0)
            result["mask_prediction"] = losses.mask_prediction_loss(self.mask_head(adapted[:, 1:])[..., 0], is_masked)
        return result

    def encode_visible(self, images: jax.Array, visible: jax.Array) -> jax.Array:
        """The frozen ViT on CLS + the visible patches only (original positions), then the same adapter."""
        vit = self.blip.vision
        patches = gather_patches(vit.patch_tokens(images), visible)
        out = vit.transform(jnp.concatenate([vit.cls_tokens(images.shape[0]), patches], axis=1))
        return self.adapter(out.last_hidden_state, out.block_outputs, vit.norm, patch_index=visible)
