"""Orbax storage of parameters.

Converted weights are stored as a flat `{dotted.parameter.path: array}` tree: readable with any Orbax
version, independent of how NNX names list indices, and cheap to restore into an abstract model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


def save_params(directory: str, params: Mapping[str, np.ndarray]) -> None:
    """Writes `params` to `directory` (which must not exist yet) and waits until it is on disk."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), dict(params))
        checkpointer.wait_until_finished()


def restore_params(directory: str) -> dict[str, np.ndarray]:
    """The flat parameter dict `save_params` wrote, as host numpy arrays in their stored dtypes."""
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.abspath(directory))
    return {key: np.asarray(jax.device_get(value)) for key, value in restored.items()}
