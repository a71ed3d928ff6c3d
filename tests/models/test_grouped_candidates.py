"""Images given once per set (`set_index`) score exactly as images repeated for every description of the set.

The reference repeats each set's images per description and runs the model's plain path; the grouped path shares
the vision tower, the adapter and every text layer's image keys/values. Sets carry 1, 2 and 3 descriptions, as
ImageCoDe's do, and the batch is cut into 1 group and into 3 (one set slot each, padding where a group has fewer
descriptions than slots).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax.models.contextblip import ContextBLIP, set_scan
from tests.runs import facts_on_devices
from tests.tiny import tiny_contextblip

CANDIDATES = 10
SET_OF_DESCRIPTION = (0, 1, 1, 2, 2, 2)
"""Set 0 has one description, set 1 two, set 2 three."""


@pytest.fixture(scope="module")
def inputs() -> dict[str, jax.Array]:
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 2000, size=(len(SET_OF_DESCRIPTION), 12))
    ids[:, 0] = 30523
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    return {
        "sets": jnp.asarray(rng.standard_normal((3, CANDIDATES, 32, 32, 3)), jnp.float32),
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.asarray(mask, jnp.int32),
        "is_video": jnp.asarray([False, True, True, False, False, False]),
    }


def scores(model: ContextBLIP, method: str, images, ids, mask, is_video, set_index=None) -> jax.Array:
    if method == "zero_shot_scores":
        return model.zero_shot_scores(images, ids, mask, set_index)
    if method == "finetune_logits":
        return model.finetune_logits(images, ids, mask, set_index=set_index)
    return model.context_logits(images, ids, mask, is_video, set_index=set_index)


def three_groups(inputs: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array, np.ndarray]:
    """Groups of 1 set slot and 3 description slots: [d0, pad, pad], [d1, d2, pad], [d3, d4, d5]; returns the
    grouped text fields, set_index [3, 3] and where each real description sits."""
    slots = np.array([0, -1, -1, 1, 2, -1, 3, 4, 5])
    take = np.where(slots < 0, 0, slots)
    text = {name: inputs[name][take] for name in ("input_ids", "attention_mask", "is_video")}
    return text, jnp.zeros((3, 3), jnp.int32), np.flatnonzero(slots >= 0)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("method", ["zero_shot_scores", "finetune_logits", "context_logits"])
def test_grouped_scores_equal_the_repeated_images(inputs, method, scan):
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    set_scan(model, scan)
    ids, mask, is_video = inputs["input_ids"], inputs["attention_mask"], inputs["is_video"]
    repeated = inputs["sets"][jnp.asarray(SET_OF_DESCRIPTION)]
    expected = scores(model, method, repeated, ids, mask, is_video)

    one_group = jnp.asarray([SET_OF_DESCRIPTION], jnp.int32)
    chex.assert_trees_all_close(
        scores(model, method, inputs["sets"], ids, mask, is_video, one_group), expected, atol=1e-6, rtol=1e-6
    )
    text, set_index, real = three_groups(inputs)
    grouped = scores(
        model, method, inputs["sets"], text["input_ids"], text["attention_mask"], text["is_video"], set_index
    )
    chex.assert_trees_all_close(grouped[real], expected, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(grouped[real], -1), np.argmax(expected, -1))


def test_grouped_gradients_equal_the_repeated_images(inputs):
    """Backward through the shared image work: each image's gradient is the sum over the descriptions reading it."""
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    targets = jnp.asarray([3, 0, 9, 5, 5, 1])

    def loss(model: ContextBLIP, images: jax.Array, set_index: jax.Array | None) -> jax.Array:
        logits = model.finetune_logits(images, ids, mask, set_index=set_index)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1).sum()

    repeated = inputs["sets"][jnp.asarray(SET_OF_DESCRIPTION)]
    expected_loss, expected = nnx.value_and_grad(loss)(model, repeated, None)
    grouped_loss, grouped = nnx.value_and_grad(loss)(model, inputs["sets"], jnp.asarray([SET_OF_DESCRIPTION]))
    chex.assert_trees_all_close(grouped_loss, expected_loss, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(nnx.to_pure_dict(grouped), nnx.to_pure_dict(expected), atol=1e-5, rtol=1e-5)


def test_a_set_index_that_does_not_split_the_batch_is_refused(inputs):
    model = ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="equal groups"):
        model.zero_shot_scores(
            inputs["sets"], inputs["input_ids"], inputs["attention_mask"], jnp.zeros((2, 3), jnp.int32)
        )


COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


@pytest.mark.long
def test_on_8_devices_each_description_reads_its_set_where_it_lies():
    """8 data shards, one group each (1 set slot, 2 description slots): the compiled scoring program moves no
    data between devices (no collective: every gather of a set's keys and values is local), and its scores
    equal the repeated images'."""
    facts = facts_on_devices("tests.models.test_grouped_candidates", 8)
    assert facts["collectives"] == [], facts
    assert facts["max_difference"] < 1e-6, facts


def _facts_on_8_devices() -> dict:
    from contextblip_jax import parallel

    mesh = parallel.make_mesh((8, 1, 1))
    rng = np.random.default_rng(5)
    sets = jnp.asarray(rng.standard_normal((8, CANDIDATES, 32, 32, 3)), jnp.float32)
    ids = rng.integers(1000, 2000, size=(16, 12))
    ids[:, 0] = 30523
    mask = np.ones_like(ids)
    mask[::3, 9:] = 0
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    set_index = jnp.zeros((8, 2), jnp.int32)
    graphdef, state = nnx.split(ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0)))

    def grouped(state, images, ids, mask, set_index):
        return nnx.merge(graphdef, state).finetune_logits(images, ids, mask, set_index=set_index)

    def repeated(state, images, ids, mask):
        return nnx.merge(graphdef, state).finetune_logits(images, ids, mask)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = parallel.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        program = jax.jit(grouped, in_shardings=(replicated, split, split, split, split)).lower(
            state, sets, ids, mask, set_index
        )
        text = program.compile().as_text()
        scores = program.compile()(state, sets, ids, mask, set_index)
        expected = jax.jit(repeated)(state, jnp.repeat(sets, 2, axis=0), ids, mask)
    return {
        "collectives": sorted({name for name in COLLECTIVES if name in text}),
        "max_difference": float(jnp.max(jnp.abs(scores - expected))),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(_facts_on_8_devices()))
