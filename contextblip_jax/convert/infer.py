"""The architecture of a checkpoint: read from a Hugging Face `config.json`, or inferred from tensor shapes.

Original salesforce/BLIP files carry no config, so widths, depths, patch and image size come from the
tensors; heads are taken 64 wide, as in every BLIP checkpoint (`--model-config` overrides). Fields that the
tensors determine are cross-checked against any given config, so a contradiction is an error, not a
silently wrong model.

Imports: its own package (`convert`), `models`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig, TextConfig, VisionConfig, flatten_dict

HEAD_DIM = 64
ORIGINAL_VISION_EPS = 1e-6
"""salesforce/BLIP's ViT uses LayerNorm(eps=1e-6); Hugging Face's config says 1e-5. Each keeps its own."""

_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}
_HF_VISION = VisionConfig(image_size=384, layer_norm_eps=1e-5)
_HF_TEXT = TextConfig(num_heads=8)
"""Hugging Face's defaults for fields a config.json omits (its text tower defaults to 8 heads)."""

_REQUIRED = (
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "text_encoder.embeddings.word_embeddings.weight",
    "text_encoder.embeddings.position_embeddings.weight",
    "text_encoder.encoder.layer.0.intermediate.dense.weight",
    "text_encoder.encoder.layer.0.crossattention.self.key.weight",
    "vision_proj.weight",
)


def missing_for_inference(tensors: Mapping[str, np.ndarray]) -> list[str]:
    return [key for key in _REQUIRED if key not in tensors]


def infer_config(tensors: Mapping[str, np.ndarray], vision_eps: float) -> BlipConfig:
    """The architecture that Hugging Face-named `tensors` imply (see `missing_for_inference` first)."""
    width = tensors["vision_model.embeddings.class_embedding"].shape[-1]
    patch = tensors["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = math.isqrt(tensors["vision_model.embeddings.position_embedding"].shape[1] - 1)
    words = tensors["text_encoder.embeddings.word_embeddings.weight"]
    vision = VisionConfig(
        width=width,
        depth=count_layers(tensors, r"vision_model\.encoder\.layers\.(\d+)\."),
        num_heads=max(width // HEAD_DIM, 1),
        mlp_dim=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=vision_eps,
    )
    text = TextConfig(
        vocab_size=words.shape[0],
        width=words.shape[1],
        depth=count_layers(tensors, r"text_encoder\.encoder\.layer\.(\d+)\."),
        num_heads=max(words.shape[1] // HEAD_DIM, 1),
        mlp_dim=tensors["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_positions=tensors["text_encoder.embeddings.position_embeddings.weight"].shape[0],
        encoder_width=tensors["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1],
    )
    return BlipConfig(vision=vision, text=text, embed_dim=tensors["vision_proj.weight"].shape[0])


def config_from_hf(hf: Mapping[str, Any]) -> BlipConfig:
    """Our config from a Hugging Face `BlipConfig` JSON (fields it omits take Hugging Face's defaults)."""
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vision = VisionConfig(
        width=v.get("hidden_size", _HF_VISION.width),
        depth=v.get("num_hidden_layers", _HF_VISION.depth),
        num_heads=v.get("num_attention_heads", _HF_VISION.num_heads),
        mlp_dim=v.get("intermediate_size", _HF_VISION.mlp_dim),
        image_size=v.get("image_size", _HF_VISION.image_size),
        patch_size=v.get("patch_size", _HF_VISION.patch_size),
        layer_norm_eps=v.get("layer_norm_eps", _HF_VISION.layer_norm_eps),
        activation=_activation(v.get("hidden_act", "gelu")),
    )
    text = TextConfig(
        vocab_size=t.get("vocab_size", _HF_TEXT.vocab_size),
        width=t.get("hidden_size", _HF_TEXT.width),
        depth=t.get("num_hidden_layers", _HF_TEXT.depth),
        num_heads=t.get("num_attention_heads", _HF_TEXT.num_heads),
        mlp_dim=t.get("intermediate_size", _HF_TEXT.mlp_dim),
        max_positions=t.get("max_position_embeddings", _HF_TEXT.max_positions),
        encoder_width=t.get("encoder_hidden_size", vision.width),
        layer_norm_eps=t.get("layer_norm_eps", _HF_TEXT.layer_norm_eps),
        activation=_activation(t.get("hidden_act", "gelu")),
    )
    return BlipConfig(vision=vision, text=text, embed_dim=hf.get("image_text_hidden_size", 256))


SHAPE_FIELDS = (
    "vision.width",
    "vision.depth",
    "vision.mlp_dim",
    "vision.patch_size",
    "text.vocab_size",
    "text.width",
    "text.depth",
    "text.mlp_dim",
    "text.max_positions",
    "text.encoder_width",
    "embed_dim",
)
"""Fields the tensors fix. Heads, epsilons and activations are not visible in shapes; the image size may
differ on purpose (position embeddings are then resampled)."""


def contradictions(config: BlipConfig, inferred: BlipConfig) -> list[str]:
    """Every shape-determined field where `config` disagrees with what the tensors say."""
    given, actual = flatten_dict(config.to_dict()), flatten_dict(inferred.to_dict())
    return [
        f"model config {field} = {given[field]}, but the tensors have {actual[field]}"
        for field in SHAPE_FIELDS
        if given[field] != actual[field]
    ]


C = TypeVar("C", BlipConfig, ContextBLIPConfig)


def resolve(
    base: C, overrides: Mapping[str, Any], inferred: BlipConfig | None, blip_of: Callable[[C], BlipConfig]
) -> tuple[C | None, list[str]]:
    """`base` with the user's `overrides`, checked: (config, []) or (None, every problem). The BLIP part
    (`blip_of(config)`) must agree with what the tensors say (`inferred`, when they say enough)."""
    try:
        config = base.override(dict(overrides))
    except (TypeError, ValueError) as error:
        return None, [f"invalid model config: {error}"]
    problems = contradictions(blip_of(config), inferred) if inferred is not None else []
    try:
        config.validate()
    except ValueError as error:
        problems.append(f"invalid model config: {error}")
    return (None if problems else config), problems


def count_layers(tensors: Mapping[str, np.ndarray], pattern: str) -> int:
    """1 + the highest index `pattern`'s group captures in the tensor names (0 if none): a missing middle layer
    then shows up as missing keys rather than a silently shallower model."""
    indices = {int(m.group(1)) for key in tensors if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def _activation(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (known: {sorted(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[name]
