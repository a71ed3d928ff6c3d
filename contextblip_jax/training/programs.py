"""The programs a training run executes: its state and batch shardings, the jitted train step and the jitted
predict step. The trainer and ahead-of-time compilation (`aot.py`, `--compile_only`) both build them here, so
what is compiled for a TPU slice without the slice is exactly what the run would execute on it: same function,
shardings, donation, logical-axis rules, dtype, remat and gradient accumulation.

    programs = build(config, stage, model, mesh, steps_per_epoch)   # model: in its shards, or from nnx.eval_shape
    state, metrics = programs.train_step(state, batch)
    scores = programs.predict(state.trainable, state.frozen, batch)

Imports: its own package (`training`), `models`, `parallel`, `stages`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from contextblip_jax import parallel
from contextblip_jax.models import axes
from contextblip_jax.models.contextblip import ContextBLIP, set_attention, set_dropout, set_remat, set_scan
from contextblip_jax.stages import SET_INDEX, Stage
from contextblip_jax.training import optim
from contextblip_jax.training.step import ModelSpec, Params, TrainState, make_predict_step, make_train_step, split_model

NEGATIVES = ("global", "per_device")
"""Where stage 1 draws hard negatives from (`loss.negatives`): the whole global batch, or each device's shard."""


@dataclasses.dataclass
class Programs:
    """A run's jitted steps and what they need. `trainable`/`frozen` hold the model's values: arrays, or
    `jax.ShapeDtypeStruct`s when the model was built abstractly. `train_step` is None for a stage that does not
    train (zero-shot scoring, which the benchmark times), `predict` for a stage without scores; `features`
    (trainable, frozen, batch) -> each description's candidate vectors, for a stage that can train on them
    cached (`Stage.features`)."""

    spec: ModelSpec
    trainable: Params
    frozen: Params
    tx: optax.GradientTransformation
    state_sharding: TrainState
    batch_sharding: jax.sharding.NamedSharding
    train_step: Any
    predict: Callable | None
    features: Callable | None = None


def build(
    config: ml_collections.ConfigDict,
    stage: Stage,
    model: ContextBLIP,
    mesh: jax.sharding.Mesh,
    steps_per_epoch: int,
) -> Programs:
    """Splits `model` (after setting the config's remat, layer scan, attention and dropout) and jits the train and
    predict steps on `mesh`.

    The train step donates its state and returns it with the same shardings; the predict step takes the state's
    parameters and a batch in the shardings the trainer and its evaluators already give them. With
    `loss.negatives == "per_device"` stage 1 draws its hard negatives within each of the data × fsdp batch shards.
    `config` is a prepared one (`runconfig.prepare`).
    """
    set_remat(model, tuple(config.remat), config.remat_policy)
    set_scan(model, config.scan_layers)
    set_attention(model, config.attention)
    set_dropout(model, config.dropout.text, config.dropout.tmim)
    per_device = config.loss.negatives == "per_device" and stage.data == "captions"  # only stage 1 draws negatives
    shards = math.prod(dict(mesh.shape)[axis] for axis in axes.BATCH_AXES) if per_device else 1
    spec, trainable, frozen = split_model(model, stage.trainable_filter(config.trainable))
    rules = axes.logical_rules(config.logical_rules)
    param_sharding = parallel.flat_param_shardings(model, mesh, rules)
    tx = optim.build_optimizer(config.optimizer, trainable, steps_per_epoch)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    trainable_sharding = {k: param_sharding[k] for k in trainable}
    frozen_sharding = {k: param_sharding[k] for k in frozen}
    state_sharding = TrainState(
        step=replicated,
        trainable=trainable_sharding,
        frozen=frozen_sharding,
        opt_state=parallel.optimizer_shardings(jax.eval_shape(tx.init, trainable), trainable_sharding, mesh),
    )
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = None
    if stage.trains:
        step_fn = make_train_step(
            spec, stage, config.loss, tx, seed=config.seed, accum_steps=config.grad_accum_steps, batch_shards=shards
        )
        train_step = jax.jit(
            _traced_on(mesh, rules, step_fn),
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        )
    predict = None
    if stage.evaluates:
        predict = jax.jit(
            _traced_on(mesh, rules, make_predict_step(spec, stage)),
            in_shardings=(trainable_sharding, frozen_sharding, batch_sharding),
        )
    features = None
    if stage.features:

        def candidate_features(trainable: Params, frozen: Params, batch: Any) -> jax.Array:
            model = spec.merge(trainable, frozen)
            inputs = (batch["images"], batch["input_ids"], batch["attention_mask"], batch.get(SET_INDEX))
            return model.candidate_features(*inputs).astype(jnp.float32)

        features = jax.jit(
            _traced_on(mesh, rules, candidate_features),
            in_shardings=(trainable_sharding, frozen_sharding, batch_sharding),
        )
    return Programs(spec, trainable, frozen, tx, state_sharding, batch_sharding, train_step, predict, features)


def _traced_on(mesh: jax.sharding.Mesh, rules: axes.Rules, fn: Callable) -> Callable:
    """`fn` traced with `mesh` and the logical-axis `rules` in scope: the towers' activation constraints
    (`axes.with_logical_constraint`) read both while the step is traced, whether the trainer calls it or
    `--compile_only` lowers it, and need nothing from the caller."""

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
            return fn(*args)

    return traced
