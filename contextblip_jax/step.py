"""The pure train and evaluation steps of every stage of `stages.py`. The model is split into a graph (static) and
flat parameter dicts outside jit; inside, `merge` rebuilds it. Trainable and frozen parameters are separate dicts,
so the optimizer state covers only what trains and frozen weights cannot change by construction.

All randomness (dropout, TMIM masks, hard negatives) comes from the run's key folded with the step, so a
resumed run draws exactly what an uninterrupted one would.

Imports: the model and the stage table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import dotted_path
from contextblip_jax.stages import Stage

Params = dict[str, jax.Array]


@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: Params
    frozen: Params
    opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "trainable", "frozen", "opt_state"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a ContextBLIP from flat parameter dicts inside jit."""

    graphdef: Any
    rest: Any
    paths: Mapping[str, tuple]

    def merge(self, *params: Params) -> ContextBLIP:
        flat = [(self.paths[name], nnx.Param(value)) for group in params for name, value in group.items()]
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat), self.rest)


def split_model(model: ContextBLIP, trainable: nnx.filterlib.Filter) -> tuple[ModelSpec, Params, Params]:
    """(spec, trainable params, frozen params) with dotted names; `trainable` selects what trains.

    The values are whatever the variables hold: arrays, or `jax.ShapeDtypeStruct`s for a model built with
    `nnx.eval_shape` (ahead-of-time compilation needs the split without any weights)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    paths = {dotted_path(path): path for path, _ in flat}
    wanted = {dotted_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, trainable))}
    values = {dotted_path(path): var.get_value() for path, var in flat}
    trained = {name: value for name, value in values.items() if name in wanted}
    frozen = {name: value for name, value in values.items() if name not in wanted}
    return ModelSpec(graphdef, rest, paths), trained, frozen


def micro_batch_groups(batch_shards: int, accum_steps: int) -> int:
    """How many per-device blocks each micro-batch holds, in order: the global batch is sharded in order into
    `batch_shards` consecutive blocks, and `make_train_step` cuts it into `accum_steps` consecutive micro-batches.

    Either each micro-batch is `batch_shards / accum_steps` whole blocks, or it lies inside one block (1); a
    micro-batch straddling a block boundary has no per-device split, so that combination is refused.
    """
    if batch_shards % accum_steps == 0:
        return batch_shards // accum_steps
    if accum_steps % batch_shards == 0:
        return 1
    raise ValueError(
        f"per-device hard negatives need grad_accum_steps {accum_steps} and the {batch_shards} batch shards "
        "(data × fsdp) to divide one another: otherwise a micro-batch straddles two devices' examples"
    )


def make_train_step(
    spec: ModelSpec,
    stage: Stage,
    loss_config: Any,
    tx: optax.GradientTransformation,
    seed: int,
    accum_steps: int = 1,
    batch_shards: int = 1,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """One optimizer step of `stage` over a global batch, accumulating gradients over `accum_steps` micro-batches.

    Losses summed over examples (`stage.reduction == "sum"`: the candidate cross-entropy) add up across
    micro-batches; averaged ones (stage 1) average. `loss_config` is the run config's `loss` section.
    `batch_shards` > 1: stage 1 draws hard negatives within each device's examples, the batch's `batch_shards`
    in-order shards; the loss sees a micro-batch, so it gets that micro-batch's blocks (`micro_batch_groups`)
    as `loss_config.negative_groups`.
    """
    if stage.loss is None:
        raise ValueError(f"stage {stage.name!r} does not train")
    groups = micro_batch_groups(batch_shards, accum_steps)
    if groups > 1:
        loss_config = ml_collections.ConfigDict({**loss_config, "negative_groups": groups})

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_of(trainable: Params, micro: Mapping[str, jax.Array], micro_key: jax.Array):
            return stage.loss(spec.merge(trainable, state.frozen), micro, micro_key, loss_config)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.trainable, batch, key)
        else:
            micro_batches = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

            def accumulate(carry, inputs):
                index, micro = inputs
                (loss, metrics), grads = grad_fn(state.trainable, micro, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.trainable, batch, key))
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro_batches))
            metrics = jax.tree.map(lambda m: m / accum_steps, metrics)
            if stage.reduction == "mean":
                loss, grads = loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
        return TrainState(state.step + 1, trainable, state.frozen, opt_state), metrics

    return step


def make_predict_step(spec: ModelSpec, stage: Stage) -> Callable[[Params, Params, Mapping[str, jax.Array]], jax.Array]:
    """Candidate scores [B, C] of a stage (zero-shot: ITM match probability; otherwise logits), dropout off."""
    if stage.score is None:
        raise ValueError(f"stage {stage.name!r} has no candidate scores")

    def predict(trainable: Params, frozen: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
        return stage.score(spec.merge(trainable, frozen), batch)

    return predict
