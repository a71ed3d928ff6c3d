"""Tiny ContextBLIP configs for fast CPU tests (same structure as the base model, far fewer parameters)."""

from __future__ import annotations

import dataclasses

from contextblip_jax.models.config import (
    AdapterConfig,
    BlipConfig,
    ContextBLIPConfig,
    ContextConfig,
    TextConfig,
    TMIMConfig,
    VisionConfig,
)


def tiny_contextblip(**sections) -> ContextBLIPConfig:
    """ViT 32 px / patch 8 (16 patches), 4 blocks; text 2 layers; decoder 1 layer; context 2 layers."""
    config = ContextBLIPConfig(
        blip=BlipConfig(
            vision=VisionConfig(width=32, depth=4, num_heads=4, mlp_dim=64, image_size=32, patch_size=8),
            text=TextConfig(
                vocab_size=30524, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=24, encoder_width=32
            ),
            embed_dim=16,
        ),
        adapter=AdapterConfig(levels=(1, 2, 3, 4), reduction=2),
        tmim=TMIMConfig(decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64),
        context=ContextConfig(num_heads=2, mlp_dim=64),
    )
    return dataclasses.replace(config, **sections)
