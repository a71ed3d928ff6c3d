"""Named model sizes: the one table the configs, the benchmark and the tests take their architectures from.

| variant | ViT (width / depth / heads, image / patch) | text (width / depth) | parameters (TMIM) | used by        |
|---------|--------------------------------------------|----------------------|-------------------|----------------|
| tiny    | 32 / 4 / 4, 32 px / 8                      | 32 / 2               | 1.09M (0.02M)     | the tests      |
| small   | 128 / 4 / 4, 64 px / 16                    | 128 / 2              | 5.61M (0.32M)     | CPU main job   |
| B/16    | 768 / 12 / 12, 224 px / 16                 | 768 / 12             | 279.1M (39.1M)    | the paper      |
| L/16    | 1024 / 24 / 16, 224 px / 16                | 768 / 12             | 522.4M (58.3M)    | BLIP large     |

Parameters count the whole ContextBLIP; TMIM is used in stage 1 only (B/16 without it: 240.0M, the paper's
≈0.24B). Most parameters of the two small variants sit in the 30,524-word embedding table. Other sizes are a
variant plus overrides (`dataclasses.replace`, or `--config.model.…` on the command line).

Imports: its own package (`models`) only.
"""

from __future__ import annotations

from contextblip_jax.models.config import (
    AdapterConfig,
    BlipConfig,
    ContextBLIPConfig,
    ContextConfig,
    TextConfig,
    TMIMConfig,
    VisionConfig,
)

VARIANTS: dict[str, ContextBLIPConfig] = {
    "tiny": ContextBLIPConfig(
        blip=BlipConfig(
            vision=VisionConfig(width=32, depth=4, num_heads=4, mlp_dim=64, image_size=32, patch_size=8),
            text=TextConfig(width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=24, encoder_width=32),
            embed_dim=16,
        ),
        adapter=AdapterConfig(levels=(1, 2, 3, 4)),
        tmim=TMIMConfig(decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64),
        context=ContextConfig(num_heads=2, mlp_dim=64),
    ),
    "small": ContextBLIPConfig(
        blip=BlipConfig(
            vision=VisionConfig(width=128, depth=4, num_heads=4, mlp_dim=256, image_size=64, patch_size=16),
            text=TextConfig(width=128, depth=2, num_heads=4, mlp_dim=256, max_positions=64, encoder_width=128),
            embed_dim=64,
        ),
        tmim=TMIMConfig(decoder_depth=1, decoder_heads=4, decoder_mlp_dim=256),
        context=ContextConfig(num_heads=4, mlp_dim=256),
    ),
    "B/16": ContextBLIPConfig(),
    "L/16": ContextBLIPConfig(
        blip=BlipConfig(
            vision=VisionConfig(width=1024, depth=24, num_heads=16, mlp_dim=4096), text=TextConfig(encoder_width=1024)
        )
    ),
}


def variant(name: str) -> ContextBLIPConfig:
    """The architecture called `name`; an unknown name is an error listing the known ones."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; expected one of {tuple(VARIANTS)}")
    return VARIANTS[name]
