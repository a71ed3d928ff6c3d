"""The tests' model: the `tiny` row of the variant table, with sections swapped where a test needs to."""

from __future__ import annotations

import dataclasses

from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.variants import VARIANTS


def tiny_contextblip(**sections) -> ContextBLIPConfig:
    """ViT 32 px / patch 8 (16 patches), 4 blocks; text 2 layers; decoder 1 layer; context 2 layers."""
    return dataclasses.replace(VARIANTS["tiny"], **sections)
