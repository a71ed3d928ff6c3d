"""Tensor names: the original salesforce/BLIP names renamed to Hugging Face's, and the known extras to drop.

Everything downstream speaks Hugging Face names, so the original `.pth` files need only this rename.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_ORIGINAL_TO_HF = (
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
)

_KNOWN_EXTRAS = {
    "momentum encoders": r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.",
    "queues": r"^(image_queue|text_queue|idx_queue|ptr_queue)$",
    "temperature": r"^temp$",
    "position_ids buffers": r"(^|\.)position_ids$",
    "text decoder": r"^text_decoder\.",
}


def is_original_naming(names: Iterable[str]) -> bool:
    """True for salesforce/BLIP state dicts (`visual_encoder.*`), false for Hugging Face ones."""
    return any(name.startswith("visual_encoder.") for name in names)


def original_to_hf(name: str) -> str:
    for pattern, replacement in _ORIGINAL_TO_HF:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return name


def known_extra(name: str) -> str | None:
    """The kind of known, unneeded entry `name` is (momentum copy, queue, ...), or None."""
    for kind, pattern in _KNOWN_EXTRAS.items():
        if re.search(pattern, name):
            return kind
    return None
