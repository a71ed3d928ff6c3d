"""Which Hugging Face tensor fills which NNX parameter, and how its layout changes on the way.

PyTorch Linear weights are (out, in); our kernels are (in, out) with attention heads as their own axes
(`[embed] -> [heads, head_dim]`). The ViT's fused qkv rows (q | k | v) are split into three kernels, the same
layout the text tower uses. Conv weights go from (O, I, kh, kw) to (kh, kw, I, O).

Imports: its own package (`convert`), `models`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig
from contextblip_jax.models.vit import resample_posemb

Path = tuple[str | int, ...]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Fills one parameter from the source tensor `key`.

    `source_shape(target)` is the shape the source must have (None: any shape `check` accepts);
    `apply(array, target)` produces the parameter.
    """

    key: str
    source_shape: Callable[[Shape], Shape]
    apply: Callable[[np.ndarray, Shape], np.ndarray]

    def problem(self, array: np.ndarray, target: Shape) -> str | None:
        expected = self.source_shape(target)
        if tuple(array.shape) != tuple(expected):
            return f"{self.key}: shape {tuple(array.shape)}, expected {tuple(expected)}"
        return None


def _same(key: str) -> Rule:
    return Rule(key, lambda t: t, lambda a, t: a)


def _linear(key: str) -> Rule:
    """(out, in) -> (in, *out_axes); also (D, H*hd) -> (D, H, hd) for q/k/v."""
    return Rule(
        key,
        lambda t: (math.prod(t[1:]), t[0]),
        lambda a, t: a.T.reshape(t),
    )


def _from_heads(key: str) -> Rule:
    """Attention output projection (D, H*hd) -> (H, hd, D)."""
    return Rule(key, lambda t: (t[2], t[0] * t[1]), lambda a, t: a.T.reshape(t))


def _flat(key: str) -> Rule:
    """A bias stored flat, reshaped to (H, hd) or kept (D,)."""
    return Rule(key, lambda t: (math.prod(t),), lambda a, t: a.reshape(t))


def _fused_kernel(key: str, part: int) -> Rule:
    """Rows part*D:(part+1)*D of a fused (3D, D) qkv weight -> (D, H, hd)."""

    def apply(a: np.ndarray, t: Shape) -> np.ndarray:
        rows = math.prod(t[1:])
        return a[part * rows : (part + 1) * rows].T.reshape(t)

    return Rule(key, lambda t: (3 * math.prod(t[1:]), t[0]), apply)


def _fused_bias(key: str, part: int) -> Rule:
    def apply(a: np.ndarray, t: Shape) -> np.ndarray:
        size = math.prod(t)
        return a[part * size : (part + 1) * size].reshape(t)

    return Rule(key, lambda t: (3 * math.prod(t),), apply)


def _conv(key: str) -> Rule:
    return Rule(key, lambda t: (t[3], t[2], t[0], t[1]), lambda a, t: a.transpose(2, 3, 1, 0))


class _PositionRule(Rule):
    """Any square grid is accepted and resampled to the configured one."""

    def problem(self, array: np.ndarray, target: Shape) -> str | None:
        grid = math.isqrt(max(array.shape[1] - 1, 0)) if array.ndim == 3 else -1
        if array.ndim != 3 or array.shape[0] != 1 or array.shape[2] != target[2] or grid * grid + 1 != array.shape[1]:
            return f"{self.key}: shape {tuple(array.shape)}, expected (1, 1 + grid², {target[2]})"
        return None


def _position(key: str) -> Rule:
    return _PositionRule(key, lambda t: t, lambda a, t: resample_posemb(a, math.isqrt(t[1] - 1)))


def _layer_norm(prefix: str, target: Path) -> dict[Path, Rule]:
    return {(*target, "scale"): _same(f"{prefix}.weight"), (*target, "bias"): _same(f"{prefix}.bias")}


def _dense(prefix: str, target: Path, weight: Callable[[str], Rule] = _linear) -> dict[Path, Rule]:
    return {(*target, "kernel"): weight(f"{prefix}.weight"), (*target, "bias"): _flat(f"{prefix}.bias")}


def _text_attention(prefix: str, target: Path) -> dict[Path, Rule]:
    rules: dict[Path, Rule] = {}
    for name in ("query", "key", "value"):
        rules.update(_dense(f"{prefix}.self.{name}", (*target, name)))
    rules.update(_dense(f"{prefix}.output.dense", (*target, "out"), _from_heads))
    return rules


def blip_rules(config: BlipConfig) -> dict[Path, Rule]:
    """Every parameter of `BlipRetrieval(config)` with the rule that fills it from Hugging Face names."""
    v, t = "vision_model", "text_encoder"
    rules: dict[Path, Rule] = {
        ("vision", "cls_token"): _same(f"{v}.embeddings.class_embedding"),
        ("vision", "pos_embed"): _position(f"{v}.embeddings.position_embedding"),
        ("vision", "patch_embed", "kernel"): _conv(f"{v}.embeddings.patch_embedding.weight"),
        ("vision", "patch_embed", "bias"): _same(f"{v}.embeddings.patch_embedding.bias"),
        **_layer_norm(f"{v}.post_layernorm", ("vision", "norm")),
        ("text", "embeddings", "word", "embedding"): _same(f"{t}.embeddings.word_embeddings.weight"),
        ("text", "embeddings", "position", "embedding"): _same(f"{t}.embeddings.position_embeddings.weight"),
        **_layer_norm(f"{t}.embeddings.LayerNorm", ("text", "embeddings", "norm")),
        **_dense("vision_proj", ("vision_proj",)),
        **_dense("text_proj", ("text_proj",)),
        **_dense("itm_head", ("itm_head",)),
    }
    for i in range(config.vision.depth):
        src, dst = f"{v}.encoder.layers.{i}", ("vision", "blocks", i)
        for part, name in enumerate(("query", "key", "value")):
            rules[(*dst, "attn", name, "kernel")] = _fused_kernel(f"{src}.self_attn.qkv.weight", part)
            rules[(*dst, "attn", name, "bias")] = _fused_bias(f"{src}.self_attn.qkv.bias", part)
        rules.update(_dense(f"{src}.self_attn.projection", (*dst, "attn", "out"), _from_heads))
        rules.update(_layer_norm(f"{src}.layer_norm1", (*dst, "norm1")))
        rules.update(_layer_norm(f"{src}.layer_norm2", (*dst, "norm2")))
        rules.update(_dense(f"{src}.mlp.fc1", (*dst, "fc1")))
        rules.update(_dense(f"{src}.mlp.fc2", (*dst, "fc2")))
    for i in range(config.text.depth):
        rules.update(bert_layer_rules(f"{t}.encoder.layer.{i}", ("text", "layers", i), cross_attention=True))
    return rules


def bert_layer_rules(src: str, dst: Path, cross_attention: bool) -> dict[Path, Rule]:
    """A BERT layer under BERT's names (`attention.self.query`, ...) -> a `TextLayer`."""
    rules = {
        **_text_attention(f"{src}.attention", (*dst, "self_attn")),
        **_layer_norm(f"{src}.attention.output.LayerNorm", (*dst, "self_norm")),
        **_dense(f"{src}.intermediate.dense", (*dst, "fc1")),
        **_dense(f"{src}.output.dense", (*dst, "fc2")),
        **_layer_norm(f"{src}.output.LayerNorm", (*dst, "mlp_norm")),
    }
    if cross_attention:
        rules.update(_text_attention(f"{src}.crossattention", (*dst, "cross_attn")))
        rules.update(_layer_norm(f"{src}.crossattention.output.LayerNorm", (*dst, "cross_norm")))
    return rules


BLIP_PREFIX = "pretrained_blip."
"""Where the authors' ContextBLIP files keep BLIP (after their `blip.` wrappers are stripped)."""


def contextblip_rules(config: ContextBLIPConfig) -> dict[str, dict[Path, Rule]]:
    """Rules per part of `ContextBLIP(config)` from the authors' names (`blip.` wrappers stripped, BLIP itself
    renamed to Hugging Face names under `pretrained_blip.`). Parts: blip, adapter, tmim, head, context."""
    tmim = config.tmim
    parts: dict[str, dict[Path, Rule]] = {
        "blip": {
            ("blip", *path): dataclasses.replace(rule, key=BLIP_PREFIX + rule.key)
            for path, rule in blip_rules(config.blip).items()
        },
        "adapter": {
            **{
                ("adapter", "down", i, "kernel"): _linear(f"vision_adapter.down.{i}.fc.0.weight")
                for i in range(len(config.adapter.resolved_levels(config.blip.vision.depth)))
            },
            ("adapter", "up", "kernel"): _linear("vision_adapter.up.fc.0.weight"),
        },
        "tmim": {
            ("tmim", "mask_token"): _same("mask_embed"),
            ("tmim", "position"): _same("decoder_pos_embed.weight"),
            ("tmim", "text_adapter", "fc1", "kernel"): _linear("text_adapter.fc.0.weight"),
            ("tmim", "text_adapter", "fc2", "kernel"): _linear("text_adapter.fc.2.weight"),
            **_dense("recon_head", ("tmim", "head")),
        },
        "head": _dense("prediction_layer", ("head", "proj")),
        "context": {("context", "position"): _same("positional_emb.weight")},
    }
    for i in range(tmim.decoder_depth):
        parts["tmim"].update(bert_layer_rules(f"visual_decoder.encoder.layer.{i}", ("tmim", "layers", i), True))
    for i in range(config.context.depth):
        parts["context"].update(bert_layer_rules(f"transformer.{i}", ("context", "layers", i), False))
    return parts
