"""Flax NNX modules, one concept per file."""

from contextblip_jax.models.blip import BlipRetrieval
from contextblip_jax.models.config import BlipConfig, TextConfig, VisionConfig

__all__ = ["BlipConfig", "BlipRetrieval", "TextConfig", "VisionConfig"]
