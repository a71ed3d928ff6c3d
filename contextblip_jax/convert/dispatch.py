"""One entry for every PyTorch source: decide what it holds and what to build from it.

| source                         | `target="blip"`     | `target="contextblip"`                             |
|--------------------------------|---------------------|----------------------------------------------------|
| BLIP (HF folder/file, `.pth`)  | BlipRetrieval       | ContextBLIP: BLIP + fresh adapter/TMIM/heads       |
| authors' ContextBLIP file      | refused             | ContextBLIP: every part the file holds, rest fresh |

`target="auto"` picks `contextblip` for the authors' files and `blip` otherwise.

Imports: its own package (`convert`), `models`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from contextblip_jax.convert.blip import convert_blip
from contextblip_jax.convert.contextblip import (
    contextblip_from_blip,
    convert_contextblip,
    is_authors_checkpoint,
)
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.sources import read_checkpoint
from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig, deep_merge

TARGETS = ("auto", "blip", "contextblip")


@dataclasses.dataclass
class Conversion:
    """Everything a converted folder or an in-memory model needs. For ContextBLIP, `params` holds the converted
    parts only; `metadata["initialised"]` names the others (see `contextblip.full_params`)."""

    model: str
    config: BlipConfig | ContextBLIPConfig
    params: dict[str, Any]
    metadata: dict[str, Any]
    tokenizer_dir: str | None


def convert_any(path: str, target: str = "auto", overrides: Mapping[str, Any] | None = None) -> Conversion:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    raw = read_checkpoint(path)
    metadata: dict[str, Any] = {"format": raw.format}
    overrides = dict(overrides or {})
    if is_authors_checkpoint(raw.tensors):
        if target == "blip":
            raise ConversionError(
                path, ["this is an authors' ContextBLIP checkpoint: convert it with --target contextblip (or auto)"]
            )
        converted = convert_contextblip(raw, overrides)
    elif target == "contextblip":
        converted = contextblip_from_blip(convert_blip(raw, overrides.get("blip", {})), overrides)
    else:
        blip = convert_blip(raw, overrides)
        metadata.update(model="blip", itm_first_token=blip.itm_first_token, dropped=blip.dropped)
        return Conversion("blip", blip.config, blip.params, metadata, raw.tokenizer_dir)
    metadata.update(
        model="contextblip",
        itm_first_token=converted.itm_first_token,
        dropped=converted.dropped,
        stage=converted.stage,
        initialised=list(converted.initialised),
    )
    return Conversion("contextblip", converted.config, converted.params, metadata, raw.tokenizer_dir)


def with_image_size(overrides: Mapping[str, Any] | None, image_size: int | None, nested: bool) -> dict[str, Any]:
    """A partial model config that also sets the resolution (`nested`: under `blip`, as ContextBLIP's configs)."""
    result = dict(overrides or {})
    if image_size:
        change = {"vision": {"image_size": image_size}}
        result = deep_merge(result, {"blip": change} if nested else change)
    return result
