"""Flax NNX modules, one concept per file.

Modules here import only each other and `losses.py`: a model never knows about data, configs of runs,
sharding meshes or checkpoints.

Imports, for every module here: each other and `losses`.
"""

from contextblip_jax.models.blip import BlipRetrieval
from contextblip_jax.models.config import BlipConfig, TextConfig, VisionConfig

__all__ = ["BlipConfig", "BlipRetrieval", "TextConfig", "VisionConfig"]
