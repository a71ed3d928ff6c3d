"""The trainer's programs carry the config's memory and sharding choices into what is traced: the remat policy
of `remat_policy` and the towers' activation constraints on the run's mesh (`programs.build`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from contextblip_jax import parallel, runconfig, stages
from contextblip_jax.compile import aot
from contextblip_jax.training import programs
from contextblip_jax.training.step import TrainState
from tests.runs import config_file


def _built(**overrides) -> tuple:
    """The tiny finetune programs as the trainer builds them on this process's one device, with abstract inputs."""
    config = config_file("synthetic", "stage=finetune,variant=tiny")
    config.update_from_flattened_dict({"data.batch_size": 4, **overrides})
    config = runconfig.prepare(config, data=False)
    stage = stages.get(config.stage)
    mesh = parallel.make_mesh((1, 1, 1))
    built = programs.build(config, stage, aot.abstract_model(config), mesh, 1)
    state = jax.eval_shape(
        lambda t, f: TrainState(jnp.zeros((), jnp.int32), t, f, built.tx.init(t)), built.trainable, built.frozen
    )
    return built, state, aot.batch_shapes(config, stage, train=True)


def _train_step_jaxpr(**overrides) -> str:
    built, state, batch = _built(**overrides)
    return str(jax.make_jaxpr(built.train_step)(state, batch))


POLICIES_AS_PRINTED = {
    "full": "policy=<function nothing_saveable",
    "dots": "policy=DotsSaveable(only_if_no_batch_dims=False)",
    "dots_no_batch": "policy=DotsSaveable(only_if_no_batch_dims=True)",
}
"""How this jax prints each `remat_policy`'s `jax.checkpoint` policy in a jaxpr."""


@pytest.mark.parametrize("policy", sorted(POLICIES_AS_PRINTED))
def test_the_train_step_recomputes_blocks_under_the_configured_policy(policy: str):
    jaxpr = _train_step_jaxpr(remat=("vision", "text"), remat_policy=policy)
    for name, printed in POLICIES_AS_PRINTED.items():
        assert (printed in jaxpr) == (name == policy), (policy, printed)


def test_the_steps_constrain_the_towers_hidden_states_on_the_runs_mesh():
    """One constraint per tower block boundary at least (vision: tokens in, each block out; text: embeddings and
    each layer out), traced inside the step without the caller setting a mesh."""
    built, state, batch = _built()
    hlo = built.train_step.lower(state, batch).as_text()
    config = config_file("synthetic", "stage=finetune,variant=tiny")
    blocks = config.model.blip.vision.depth + config.model.blip.text.depth
    assert hlo.count("sharding_constraint") + hlo.count("@Sharding") >= blocks + 2


@pytest.mark.parametrize("scan", [False, True])
def test_the_train_step_scans_the_towers_blocks_when_the_config_says_so(scan: bool):
    """The tiny finetune step has no other loop than the towers' (no gradient accumulation)."""
    jaxpr = _train_step_jaxpr(scan_layers=scan)
    assert ("scan[" in jaxpr) == scan
