"""Tensor names: the original salesforce/BLIP names renamed to Hugging Face's, the ContextBLIP authors' wrappers
stripped, and the known extras to drop.

Everything downstream speaks Hugging Face names, so the original `.pth` files and the authors' files need only
`canonical`.

Imports: its own package (`convert`) only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
from absl import logging

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
    "prompt-tuning MLM head (not part of ContextBLIP)": r"^(prompt$|pred_head\.)",
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


_AUTHORS_WRAPPERS = re.compile(r"^(blip\.)+")
"""The authors' fine-tuning scripts wrap the model in `blip.` once per stage (`blip.blip.pretrained_blip.…`)."""


def canonical(tensors: Mapping[str, np.ndarray], blip_prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(renamed tensors, counts of dropped extras by kind): the authors' `blip.` wrappers stripped, BLIP's original
    names renamed to Hugging Face's, known extras dropped. BLIP's tensors are those under `blip_prefix`
    (`pretrained_blip.` in the authors' files, everything in a BLIP checkpoint); a Hugging Face name is kept."""
    kept: dict[str, np.ndarray] = {}
    dropped: Counter[str] = Counter()
    for key, value in tensors.items():
        name = _AUTHORS_WRAPPERS.sub("", key)
        prefix = blip_prefix if name.startswith(blip_prefix) else ""
        inner = name[len(prefix) :]
        if kind := known_extra(inner):
            dropped[kind] += 1
        else:
            kept[prefix + (original_to_hf(inner) if prefix == blip_prefix else inner)] = value
    if dropped:
        summary = ", ".join(f"{count} {kind}" for kind, count in sorted(dropped.items()))
        logging.info("dropped %d known extra tensors: %s", sum(dropped.values()), summary)
    return kept, dict(dropped)
