"""PyTorch BLIP checkpoints -> Flax: `load_blip` for code, `python -m contextblip_jax.convert` for files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from contextblip_jax.convert import directory
from contextblip_jax.convert.blip import build_model, convert_blip
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.sources import read_checkpoint
from contextblip_jax.models.blip import BlipRetrieval
from contextblip_jax.models.vit import resample_posemb

__all__ = ["ConversionError", "itm_first_token", "load_blip"]


def load_blip(
    path: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    image_size: int | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> BlipRetrieval:
    """A `BlipRetrieval` from a converted folder or straight from any supported PyTorch checkpoint.

    `image_size` resamples the position embeddings to another resolution (e.g. 224 for a 384-px checkpoint);
    `model_config` is a partial config overriding what the source says (PyTorch sources only).
    """
    path = os.fspath(path)
    if directory.is_converted(path):
        if model_config:
            raise ValueError(f"{path} is already converted; its architecture cannot be overridden")
        config, params, _ = directory.read_converted(path)
        if image_size and image_size != config.vision.image_size:
            config = config.override({"vision": {"image_size": image_size}})
            params["vision.pos_embed"] = resample_posemb(params["vision.pos_embed"], config.vision.grid)
        return build_model(config, params, dtype)
    overrides = dict(model_config or {})
    if image_size:
        overrides["vision"] = {**overrides.get("vision", {}), "image_size": image_size}
    converted = convert_blip(read_checkpoint(path), overrides)
    return build_model(converted.config, converted.params, dtype)


def itm_first_token(path: str) -> str:
    """The first token BLIP's ITM pass expects for this checkpoint.

    `enc` for original salesforce/BLIP and ContextBLIP `.pth`/`.pt` files (their code replaces [CLS] by [ENC]),
    `cls` for Hugging Face folders and files (its processor keeps [CLS]); converted folders remember theirs.
    """
    path = os.fspath(path)
    if directory.is_converted(path):
        return directory.read_metadata(path)["itm_first_token"]
    return "enc" if path.lower().endswith((".pth", ".pt")) else "cls"
