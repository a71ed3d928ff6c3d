"""The tests' model: the `tiny` row of the variant table, with sections swapped where a test needs to."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.stages import Stage


def tiny_contextblip(**sections) -> ContextBLIPConfig:
    """ViT 32 px / patch 8 (16 patches), 4 blocks; text 2 layers; decoder 1 layer; context 2 layers."""
    return dataclasses.replace(VARIANTS["tiny"], **sections)


def stage_batch(
    stage: Stage | None,
    targets: Sequence[int],
    is_video: Sequence[bool],
    candidates: int,
    length: int,
    padded_from: int,
) -> dict[str, jax.Array]:
    """A random batch of `len(targets)` descriptions x `candidates` 32 px images and `length` tokens (`[ENC]`
    first; the second description padded from `padded_from`), with the fields `stage` reads (all without one).
    A caption stage pairs each description with its first candidate."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(len(targets), length))
    ids[:, 0] = 30523
    mask = np.ones_like(ids)
    mask[1, padded_from:] = 0
    full = {
        "images": jnp.asarray(rng.standard_normal((len(targets), candidates, 32, 32, 3)), jnp.float32),
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.asarray(mask, jnp.int32),
        "target": jnp.asarray(targets, jnp.int32),
        "is_video": jnp.asarray(is_video),
    }
    if stage is not None and stage.data == "captions":
        full["images"] = full["images"][:, 0]
    return {name: full[name] for name in (stage.batch_fields if stage else full)}
