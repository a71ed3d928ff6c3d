"""Scanned towers (`scan_layers`, `models/stack.py`) compute what the unrolled ones compute, from the same stored
parameters, in a program that holds each block once."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax import stages
from contextblip_jax.models.config import TMIMConfig
from contextblip_jax.models.contextblip import ContextBLIP, dotted_path, set_dropout, set_remat, set_scan
from contextblip_jax.models.stack import run_blocks
from contextblip_jax.models.text import TextEncoder
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.runconfig.defaults import base_config
from tests.tiny import stage_batch, tiny_contextblip

CONFIG = tiny_contextblip(tmim=TMIMConfig(decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, mask_prediction=True))


def loss_and_grads(stage_name: str, scan: bool, remat: tuple[str, ...] = ()) -> tuple[float, dict[str, np.ndarray]]:
    """The stage's own loss on a fixed batch and its gradients for every parameter (the towers' blocks too, which
    no stage trains by default), jitted as the trainer runs them."""
    model = ContextBLIP(CONFIG, rngs=nnx.Rngs(0))
    set_scan(model, scan)
    set_remat(model, remat)
    stage = stages.get(stage_name)
    batch = stage_batch(stage, [3, 7], [True, False], candidates=10, length=6, padded_from=4)
    loss_config = base_config().loss
    loss_config.mask_prediction = 1.0
    wrt = nnx.Param

    @nnx.jit
    def run(model: ContextBLIP):
        return nnx.value_and_grad(
            lambda m: stage.loss(m, batch, jax.random.key(0), loss_config)[0], argnums=nnx.DiffState(0, wrt)
        )(model)

    value, grads = run(model)
    return float(value), {dotted_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize(
    ("stage", "remat"), [pytest.param("pretrain", (), marks=pytest.mark.long), ("finetune", ("vision", "text"))]
)
def test_scanned_towers_give_the_unrolled_loss_and_gradients(stage: str, remat: tuple[str, ...]):
    unrolled, unrolled_grads = loss_and_grads(stage, scan=False, remat=remat)
    scanned, scanned_grads = loss_and_grads(stage, scan=True, remat=remat)
    assert scanned == pytest.approx(unrolled, rel=1e-5, abs=1e-6)
    assert scanned_grads.keys() == unrolled_grads.keys()
    assert any(name.startswith("blip.vision.blocks.3.") for name in scanned_grads)
    assert any(name.startswith("blip.text.layers.1.") for name in scanned_grads)
    for name, value in unrolled_grads.items():
        np.testing.assert_allclose(scanned_grads[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_scan_keeps_the_stored_parameters_and_their_names():
    """Checkpoints and converted weights load either way: scanning changes the program, not the state."""
    model = ContextBLIP(CONFIG, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    set_scan(model, True)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_the_scanned_program_holds_each_block_once():
    """The vision tower's 4 blocks and the text tower's 2 layers: unrolled, the product count grows with depth;
    scanned, one loop per tower holds one block's products."""
    model = ContextBLIP(CONFIG, rngs=nnx.Rngs(0))
    batch = stage_batch(stages.get("finetune"), [3, 7], [True, False], candidates=10, length=6, padded_from=4)

    def program(scan: bool) -> str:
        set_scan(model, scan)
        graphdef, state = nnx.split(model)
        inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
        scores = jax.jit(lambda s: nnx.merge(graphdef, s).finetune_logits(*inputs))
        return scores.lower(state).as_text()

    unrolled, scanned = program(False), program(True)
    count = lambda text: len(re.findall(r"stablehlo\.dot_general", text))  # noqa: E731
    assert "stablehlo.while" in scanned and "stablehlo.while" not in unrolled
    vision, text = CONFIG.blip.vision.depth, CONFIG.blip.text.depth
    assert count(scanned) < count(unrolled) * 2 / min(vision, text)


def test_scanned_dropout_draws_masks_from_the_calls_stream():
    """With rngs and a rate above 0 the scanned text tower drops (another output than without rngs), the same
    key gives the same masks, another key other masks; at rate 0 the scan draws nothing from the stream."""
    config = VARIANTS["tiny"].blip.text
    encoder = TextEncoder(config, rngs=nnx.Rngs(1))
    encoder.scan = True
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 2000, (3, 6)), jnp.int32)
    mask = jnp.ones_like(ids)
    plain = encoder(ids, mask).last_hidden_state
    rngs = nnx.Rngs(dropout=0)
    assert np.array_equal(encoder(ids, mask, rngs=rngs).last_hidden_state, plain)
    assert int(rngs.dropout.count[...]) == 0
    model = ContextBLIP(CONFIG, rngs=nnx.Rngs(0))
    set_dropout(model, 0.1, 0.0)
    encoder = model.blip.text
    encoder.scan = True
    plain = encoder(ids, mask).last_hidden_state
    first = encoder(ids, mask, rngs=nnx.Rngs(dropout=0)).last_hidden_state
    again = encoder(ids, mask, rngs=nnx.Rngs(dropout=0)).last_hidden_state
    other = encoder(ids, mask, rngs=nnx.Rngs(dropout=1)).last_hidden_state
    assert not np.allclose(first, plain) and not np.allclose(first, other)
    np.testing.assert_array_equal(first, again)


def test_blocks_of_different_structure_are_refused():
    text = TextEncoder(VARIANTS["tiny"].blip.text, rngs=nnx.Rngs(0))
    text.layers[1].self_attn.implementation = "xla"
    with pytest.raises(ValueError, match="scan needs identical blocks"):
        run_blocks(text.layers, jnp.zeros((1, 2, 32)), lambda b, x, r: (x, None), remat_policy=None, scan=True)
