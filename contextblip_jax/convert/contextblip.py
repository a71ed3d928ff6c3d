"""ContextBLIP checkpoints: the authors' PyTorch files, or a plain BLIP checkpoint as stage 1's starting point.

The authors' files (github.com/LHL3341/ContextBLIP) come in three shapes, told apart by their keys:
- pretrain: BLIP, adapter, TMIM decoder + text adapter (`pretrained_blip.*`, `vision_adapter.*`,
  `visual_decoder.*`, `mask_embed`, ...);
- finetune: BLIP and adapter under `blip.`, plus the scoring head `prediction_layer.*`;
- context: all of that under one more `blip.`, plus the inter-context encoder (`transformer.*`,
  `positional_emb.*`).

The `blip.` wrappers are stripped, BLIP's original names renamed to Hugging Face's, and every part the stage
holds is mapped by name; parts it does not hold (TMIM after pre-training, the heads before fine-tuning) start
from a fresh initialisation and are listed in the conversion report.

Imports: its own package (`convert`), `models`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from contextblip_jax.convert import infer, names
from contextblip_jax.convert.blip import (
    ConvertedBlip,
    apply_rules,
    check_rules,
    load_params,
    param_shapes,
)
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.mapping import BLIP_PREFIX, contextblip_rules
from contextblip_jax.convert.sources import RawCheckpoint
from contextblip_jax.models.config import AdapterConfig, ContextBLIPConfig, ContextConfig, TMIMConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import dotted_path

PARTS = ("blip", "adapter", "tmim", "head", "context")
STAGE_PARTS = {
    "pretrain": ("blip", "adapter", "tmim"),
    "finetune": ("blip", "adapter", "head"),
    "context": ("blip", "adapter", "head", "context"),
}


@dataclasses.dataclass
class ConvertedContextBLIP:
    """Converted parameters of the parts present, by dotted path; `initialised` lists the parts absent."""

    config: ContextBLIPConfig
    params: dict[str, jax.Array]
    stage: str
    initialised: tuple[str, ...]
    dropped: dict[str, int]
    itm_first_token: str = "enc"


def is_authors_checkpoint(keys: Any) -> bool:
    return any(key.startswith(("pretrained_blip.", "blip.pretrained_blip.", "blip.blip.")) for key in keys)


def authors_stage(keys: Any) -> str:
    keys = list(keys)
    if any(k.startswith(("transformer.", "positional_emb.")) for k in keys):
        return "context"
    if any(re.match(r"^(blip\.)*prediction_layer\.", k) for k in keys):
        return "finetune"
    return "pretrain"


def convert_contextblip(raw: RawCheckpoint, overrides: Mapping[str, Any] | None = None) -> ConvertedContextBLIP:
    """Checks and converts an authors' checkpoint (consuming `raw`'s tensors); `overrides` is a partial
    ContextBLIP config, e.g. `{"tmim": {"decoder_heads": 8}}`."""
    stage = authors_stage(raw.tensors)
    tensors, dropped = names.canonical(raw.tensors, BLIP_PREFIX)
    raw.tensors.clear()
    blip_view = {k[len(BLIP_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BLIP_PREFIX)}
    missing = infer.missing_for_inference(blip_view)
    if missing:
        raise ConversionError(raw.path, [f"missing key {BLIP_PREFIX}{k} (needed to infer BLIP)" for k in missing])
    inferred_blip = infer.infer_config(blip_view, infer.ORIGINAL_VISION_EPS)
    config, problems = infer.resolve(
        _infer_parts(tensors, inferred_blip), overrides or {}, inferred_blip, lambda config: config.blip
    )
    if config is None:
        raise ConversionError(raw.path, problems)
    parts = contextblip_rules(config)
    rules = {path: rule for part in STAGE_PARTS[stage] for path, rule in parts[part].items()}
    shapes = param_shapes(lambda: ContextBLIP(config, rngs=nnx.Rngs(0)))
    problems = check_rules(rules, shapes, tensors)
    if problems:
        raise ConversionError(raw.path, problems)
    initialised = tuple(part for part in PARTS if part not in STAGE_PARTS[stage])
    logging.info("authors' %s checkpoint; freshly initialised parts: %s", stage, ", ".join(initialised))
    return ConvertedContextBLIP(config, apply_rules(rules, shapes, tensors), stage, initialised, dropped)


def contextblip_from_blip(converted: ConvertedBlip, overrides: Mapping[str, Any] | None = None) -> ConvertedContextBLIP:
    """Stage 1's starting point: a converted BLIP with fresh adapter, TMIM, head and context encoder."""
    try:
        config = ContextBLIPConfig(blip=converted.config).override(
            {k: v for k, v in (overrides or {}).items() if k != "blip"}
        )
        config.validate()
    except (TypeError, ValueError) as error:
        raise ConversionError("--model-config", [f"invalid model config: {error}"]) from error
    params = {f"blip.{name}": value for name, value in converted.params.items()}
    initialised = tuple(part for part in PARTS if part != "blip")
    return ConvertedContextBLIP(config, params, "blip", initialised, converted.dropped, converted.itm_first_token)


def build_contextblip(
    config: ContextBLIPConfig,
    params: Mapping[str, np.ndarray],
    dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
    init: str | None = None,
) -> ContextBLIP:
    """A ContextBLIP holding `params`; parameters not given keep a fresh initialisation from `seed`, drawn as
    `init` says (`ContextBLIPConfig.init`; None: as `config` says). The model's config records the init used."""
    if init is not None:
        config = dataclasses.replace(config, init=init)
    if len(params) == len(param_shapes(lambda: ContextBLIP(config, rngs=nnx.Rngs(0)))):
        return load_params(nnx.eval_shape(lambda: ContextBLIP(config, dtype=dtype, rngs=nnx.Rngs(0))), params)
    return load_params(ContextBLIP(config, dtype=dtype, rngs=nnx.Rngs(seed)), params)


def full_params(config: ContextBLIPConfig, params: Mapping[str, Any], seed: int = 0) -> dict[str, jax.Array]:
    """Every parameter: `params` plus a fresh initialisation (from `seed`) of the parts they lack."""
    model = build_contextblip(config, params, seed=seed)
    return {dotted_path(path): var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _infer_parts(tensors: Mapping[str, np.ndarray], blip: Any) -> ContextBLIPConfig:
    """Adapter, decoder and context sizes from the tensors present; heads are not visible in shapes (8, as in
    the authors' code, unless overridden). Levels spread evenly over the ViT (3/6/9/12 for 12 blocks)."""
    adapter, tmim, context = AdapterConfig(), TMIMConfig(), ContextConfig()
    levels = infer.count_layers(tensors, r"vision_adapter\.down\.(\d+)\.")
    if levels:
        hidden = tensors["vision_adapter.down.0.fc.0.weight"].shape[0]
        reduction = max(blip.vision.width // hidden, 1)
        adapter = AdapterConfig(levels=AdapterConfig().resolved_levels(blip.vision.depth, levels), reduction=reduction)
    depth = infer.count_layers(tensors, r"visual_decoder\.encoder\.layer\.(\d+)\.")
    if depth:
        tmim = dataclasses.replace(
            tmim,
            decoder_depth=depth,
            decoder_mlp_dim=tensors["visual_decoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        )
    if "text_adapter.fc.0.weight" in tensors:
        hidden = tensors["text_adapter.fc.0.weight"].shape[0]
        tmim = dataclasses.replace(tmim, text_adapter_reduction=max(blip.text.width // hidden, 1))
    depth = infer.count_layers(tensors, r"transformer\.(\d+)\.")
    if depth:
        context = dataclasses.replace(
            context, depth=depth, mlp_dim=tensors["transformer.0.intermediate.dense.weight"].shape[0]
        )
    if "positional_emb.weight" in tensors:
        context = dataclasses.replace(context, num_candidates=tensors["positional_emb.weight"].shape[0])
    return ContextBLIPConfig(blip=blip, adapter=adapter, tmim=tmim, context=context)
