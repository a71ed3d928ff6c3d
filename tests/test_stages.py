"""The stage table: every row is consistent, and the trainer's data gives each stage what it reads; the stage
losses' dropout and per-device negatives."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from contextblip_jax import stages
from contextblip_jax.models.config import AdapterConfig
from contextblip_jax.models.contextblip import ContextBLIP, set_dropout
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training.step import TrainState, make_train_step, micro_batch_groups, split_model
from tests.tiny import stage_batch, tiny_contextblip


@pytest.mark.parametrize("stage", stages.STAGES.values(), ids=list(stages.STAGES))
def test_rows_are_consistent(stage):
    assert stages.get(stage.name) is stage
    re.compile(stage.trainable)
    assert stage.trains == (stage.loss is not None)
    assert stage.reduction in ("sum", "mean")
    assert stage.data in ("imagecode", "captions")
    fields = stages.CAPTION_FIELDS if stage.data == "captions" else stages.IMAGECODE_FIELDS
    assert set(stage.batch_fields) <= set(fields)
    assert stage.evaluates == (stage.score is not None)
    assert stage.epochs >= 0 and (stage.epochs > 0) == stage.trains


def test_the_papers_stages_and_their_epochs():
    assert {name: (s.trains, s.evaluates, s.epochs) for name, s in stages.STAGES.items()} == {
        "pretrain": (True, False, 20),
        "zeroshot": (False, True, 0),
        "finetune": (True, True, 40),
        "context": (True, True, 20),
    }


def test_unknown_stage_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown stage 'warmup'; expected one of \('pretrain', 'zeroshot'"):
        stages.get("warmup")


def test_trainable_override_replaces_the_default():
    model_paths = ["context.position", "head.proj.kernel", "blip.vision.norm.scale"]
    stage = stages.get("context")

    def selected(pattern: str) -> list[str]:
        compiled = re.compile(pattern or stage.trainable)
        return [p for p in model_paths if compiled.search(p)]

    assert selected("") == ["context.position"]
    assert selected(r"^(context|head)\.") == ["context.position", "head.proj.kernel"]


CONFIG = tiny_contextblip(
    blip=dataclasses.replace(VARIANTS["tiny"].blip, vision=dataclasses.replace(VARIANTS["tiny"].blip.vision, depth=2)),
    adapter=AdapterConfig(levels=(1, 2)),
)
"""The tiny model cut to 2 vision blocks: the text encoder and the decoder, which hold the dropout, stay whole."""


def batch(stage: stages.Stage, descriptions: int = 4, candidates: int = 3) -> dict[str, jax.Array]:
    """The fields `stage` reads, for `descriptions` x `candidates` (a caption stage takes the first candidate)."""
    targets = np.arange(descriptions) % candidates
    return stage_batch(stage, targets, np.arange(descriptions) % 2 == 0, candidates, length=6, padded_from=4)


def random_draws(fn: Callable[..., Any], *args: Any) -> int:
    """How many `random_bits` a traced function draws, nested programs included: dropout's masks here. Traced
    through a new function each time: `make_jaxpr` caches by function, and a closed-over model's rates are not
    part of that cache's key."""

    def count(jaxpr: jax.extend.core.Jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name == "random_bits"
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        total += count(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        total += count(sub)
        return total

    return count(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


def test_dropout_reaches_every_text_pass_and_draws_nothing_at_rate_zero():
    """One mask per BERT dropout site: embeddings, then per layer the attention probabilities and each sub-layer's
    output (3 sites without cross-attention, 5 with). Stage 1 runs the ITC pass, the two ITM passes and the
    decoder with dropout, 2a its ITM pass; at rate 0 neither draws a dropout mask."""
    model, key, config = ContextBLIP(CONFIG, rngs=nnx.Rngs(0)), jax.random.key(0), base_config().loss
    text, decoder = CONFIG.blip.text.depth, CONFIG.tmim.decoder_depth
    expected = {"pretrain": (1 + 3 * text) + 2 * (1 + 5 * text) + 5 * decoder, "finetune": 1 + 5 * text}
    for name, extra in expected.items():
        stage = stages.get(name)

        def loss(key: jax.Array, stage: stages.Stage = stage) -> jax.Array:
            return stage.loss(model, batch(stage), key, config)[0]

        set_dropout(model, text=0.0, tmim=0.0)
        off = random_draws(loss, key)
        set_dropout(model, text=0.1, tmim=0.1)
        assert random_draws(loss, key) - off == extra, name
        assert name != "finetune" or off == 0


def test_finetune_step_with_dropout_changes_the_loss_and_repeats_exactly():
    """The trainer's step: dropout's masks come from the run's seed folded with the step, so a step recomputed
    (a resumed run) draws the same ones and the next step others."""
    stage = stages.get("finetune")
    model = ContextBLIP(CONFIG, rngs=nnx.Rngs(0))
    tx = optax.sgd(1.0)

    def losses_at(rate: float) -> list[float]:
        set_dropout(model, text=rate, tmim=0.0)
        spec, trainable, frozen = split_model(model, stage.trainable_filter())
        step = jax.jit(make_train_step(spec, stage, base_config().loss, tx, seed=0))
        state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
        later = dataclasses.replace(state, step=jnp.ones((), jnp.int32))
        return [float(step(s, batch(stage))[1]["loss"]) for s in (state, state, later)]

    off, on = losses_at(0.0), losses_at(0.1)
    assert off[0] == off[1] == off[2]  # no dropout: the step's key changes nothing
    assert on[0] == on[1]  # same seed and step: the same masks
    assert on[0] != on[2] and abs(on[0] - off[0]) > 1e-4


def test_micro_batch_groups_are_the_batch_shards():
    """Micro-batches taken by stride hold a share of every shard: 8 shards, 2 micro-batches of a batch of 32 make
    8 groups of 2 in each micro-batch; a shard that the micro-batches do not divide is refused."""
    for shards, accum, size, groups in ((8, 1, 16, 8), (8, 2, 32, 8), (2, 4, 8, 2), (1, 3, 6, 1)):
        assert micro_batch_groups(shards, accum, size) == groups
    for shards, accum, size in ((4, 3, 16), (6, 4, 12)):
        with pytest.raises(ValueError, match="unequal micro-batches"):
            micro_batch_groups(shards, accum, size)


def test_the_train_step_gives_the_loss_its_micro_batch_groups_and_stage_one_uses_them():
    model = ContextBLIP(CONFIG, rngs=nnx.Rngs(0))

    def record(model: ContextBLIP, batch: stages.Batch, key: jax.Array, config: Any, groups: int = 1):
        """A loss that only reports the groups the step handed it."""
        del model, key, config
        return 0.0 * batch["x"].sum(), {"groups": jnp.float32(groups)}

    recording = dataclasses.replace(stages.get("finetune"), loss=record)
    spec, trainable, frozen = split_model(model, recording.trainable_filter())
    tx = optax.sgd(1.0)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
    for shards, accum, groups in ((4, 2, 4), (1, 2, 1), (2, 4, 2)):
        step = make_train_step(spec, recording, base_config().loss, tx, seed=0, accum_steps=accum, batch_shards=shards)
        assert float(jax.jit(step)(state, {"x": jnp.zeros((8, 1))})[1]["groups"]) == groups

    pretrain, config = stages.get("pretrain"), base_config().loss
    jax.eval_shape(lambda key: pretrain.loss(model, batch(pretrain), key, config, 2)[0], jax.random.key(0))
    with pytest.raises(ValueError, match="cannot be split into 2 equal blocks"):
        jax.eval_shape(lambda key: pretrain.loss(model, batch(pretrain, 3), key, config, 2)[0], jax.random.key(0))
    config.tmim_token = "word"
    with pytest.raises(ValueError, match="TMIM text token 'word' unknown"):
        jax.eval_shape(lambda key: pretrain.loss(model, batch(pretrain), key, config, 2)[0], jax.random.key(0))
