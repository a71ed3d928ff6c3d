"""The towers' hidden states between blocks are split over the batch on a mesh, and untouched without one.

The pytest process holds a 1-device CPU backend, so the check runs this file as a script in a child process with
8 simulated CPU devices (`python -m tests.models.test_activation_sharding`), which prints what it measured as JSON.
Inputs and parameters are replicated: only the towers' own constraints can split the outputs over the batch.
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from contextblip_jax import parallel
from contextblip_jax.models.text import TextEncoder
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.models.vit import VisionTransformer
from tests.runs import facts_on_devices

VISION, TEXT = VARIANTS["tiny"].blip.vision, VARIANTS["tiny"].blip.text
MESHES = [(2, 4, 1), (2, 2, 2)]


def _spec(spec: PartitionSpec) -> list:
    return [list(axis) if isinstance(axis, tuple) else axis for axis in spec]


def _tower_facts() -> dict:
    """Each tower output's PartitionSpec on each mesh (and without one), and its largest difference from the
    same towers run eagerly on one device."""
    rng = np.random.default_rng(0)
    vision, text = VisionTransformer(VISION, rngs=nnx.Rngs(0)), TextEncoder(TEXT, rngs=nnx.Rngs(1))
    inputs = (
        jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32),
        jnp.asarray(rng.integers(1000, 2000, (8, 6)), jnp.int32),
        jnp.ones((8, 6), jnp.int32).at[:, 4:].set(0),
        jnp.asarray(rng.standard_normal((8, 5, TEXT.encoder_width)), jnp.float32),
    )

    def forward(vision: VisionTransformer, text: TextEncoder, images, ids, mask, tokens) -> dict[str, jax.Array]:
        seen = vision(images)
        read = text(ids, mask, tokens)
        blocks = {f"vision block {i + 1}": x for i, x in enumerate(seen.block_outputs)}
        return {**blocks, "vision": seen.last_hidden_state, "text": read.last_hidden_state}

    eager = forward(vision, text, *inputs)
    (vision_graph, vision_state), (text_graph, text_state) = nnx.split(vision), nnx.split(text)

    def run(vision_state: nnx.State, text_state: nnx.State, *inputs: jax.Array) -> dict[str, jax.Array]:
        return forward(nnx.merge(vision_graph, vision_state), nnx.merge(text_graph, text_state), *inputs)

    facts = {}
    for shape in [None, *MESHES]:
        mesh = parallel.make_mesh(shape or (8, 1, 1))
        replicated = jax.device_put((vision_state, text_state, *inputs), NamedSharding(mesh, PartitionSpec()))
        with jax.set_mesh(mesh) if shape else contextlib.nullcontext():
            outputs = jax.jit(run)(*replicated)
        facts[str(shape)] = {
            name: {"spec": _spec(x.sharding.spec), "diff": float(np.abs(np.asarray(x) - eager[name]).max())}
            for name, x in outputs.items()
        }
    return facts


def test_hidden_states_are_split_over_the_batch_on_a_mesh_and_nowhere_else():
    facts = facts_on_devices("tests.models.test_activation_sharding", 8)
    assert len(facts["None"]) == VISION.depth + 2
    for mesh, outputs in facts.items():
        for name, fact in outputs.items():
            assert fact["diff"] <= 1e-5, (mesh, name, fact)
            batch, *rest = fact["spec"] or [None]  # jax drops trailing Nones from an output's spec
            assert batch == (None if mesh == "None" else ["data", "fsdp"]), (mesh, name, fact)
            assert not any(rest), (mesh, name, fact)  # `embed` would be fsdp, which `batch` already holds


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    print(json.dumps(_tower_facts()))
