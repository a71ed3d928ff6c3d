"""The pure train and evaluation steps of every stage of `stages.py`. The model is split into a graph (static) and
flat parameter dicts outside jit; inside, `merge` rebuilds it. Trainable and frozen parameters are separate dicts,
so the optimizer state covers only what trains and frozen weights cannot change by construction.

All randomness (dropout, TMIM masks, hard negatives) comes from the run's key folded with the step, so a
resumed run draws exactly what an uninterrupted one would.

Imports: its own package (`training`), `models`, `stages`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import dotted_path
from contextblip_jax.stages import SET_INDEX, Stage

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


def micro_batches(batch: Mapping[str, jax.Array], accum_steps: int) -> Mapping[str, jax.Array]:
    """The batch as `accum_steps` micro-batches [accum_steps, B / accum_steps, ...], taken by stride: micro-batch
    m holds examples m, m + accum_steps, m + 2·accum_steps, ...

    The global batch is sharded in order over the data × fsdp devices, so every micro-batch taken this way keeps
    an equal share on each device: each accumulation step runs on all of them without moving examples. Consecutive
    micro-batches would each lie on some of the devices only, and XLA would gather them (or leave devices idle).
    """
    if SET_INDEX in batch:
        return _grouped_micro_batches(batch, accum_steps)
    return jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)


def _grouped_micro_batches(batch: Mapping[str, jax.Array], accum_steps: int) -> dict[str, jax.Array]:
    """A grouped batch (`data/grouped.py`) as micro-batches of whole groups, taken by stride as above: each
    group's sets and descriptions stay together, and every device keeps its share (the plan made `groups` a
    multiple of data shards × `accum_steps`, `training/inputs.py`)."""
    groups = batch[SET_INDEX].shape[0]
    if groups % accum_steps:
        raise ValueError(f"a grouped batch of {groups} groups cannot be cut into {accum_steps} micro-batches")

    def split(x: jax.Array) -> jax.Array:
        blocks = x.reshape(groups // accum_steps, accum_steps, -1, *x.shape[1:]).swapaxes(0, 1)
        return blocks.reshape(accum_steps, -1, *x.shape[1:])

    out = {name: split(value) for name, value in batch.items() if name != SET_INDEX}
    index = batch[SET_INDEX]
    out[SET_INDEX] = index.reshape(groups // accum_steps, accum_steps, -1).swapaxes(0, 1)
    return out


def micro_batch_groups(batch_shards: int, accum_steps: int, batch_size: int) -> int:
    """How many per-device blocks each micro-batch holds, in device order: `batch_shards` (one when 1).

    The global batch of `batch_size` is sharded in order into `batch_shards` consecutive blocks, and
    `micro_batches` takes every `accum_steps`-th example, so micro-batch m is, block after block, each block's
    examples m, m + accum_steps, ...: `batch_size / (batch_shards · accum_steps)` consecutive examples per device,
    that device's micro-batch as data-parallel gradient accumulation has it. A block that `accum_steps` does not
    divide would give the devices unequal shares, so that combination is refused.
    """
    if batch_shards > 1 and batch_size % (batch_shards * accum_steps):
        raise ValueError(
            f"per-device hard negatives need grad_accum_steps {accum_steps} to divide each of the {batch_shards} "
            f"batch shards (data × fsdp) of the batch of {batch_size}: otherwise devices hold unequal micro-batches"
        )
    return batch_shards


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
    in-order shards; the loss sees a micro-batch (`micro_batches`: taken by stride), so it gets that
    micro-batch's per-device blocks (`micro_batch_groups`) as its `groups`.
    """
    if stage.loss is None:
        raise ValueError(f"stage {stage.name!r} does not train")

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        groups = micro_batch_groups(batch_shards, accum_steps, jax.tree.leaves(batch)[0].shape[0])

        def loss_of(trainable: Params, micro: Mapping[str, jax.Array], micro_key: jax.Array):
            return stage.loss(spec.merge(trainable, state.frozen), micro, micro_key, loss_config, groups)

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.trainable, batch, key)
        else:
            inputs = (jnp.arange(accum_steps), micro_batches(batch, accum_steps))

            def accumulate(carry, inputs):
                index, micro = inputs
                (loss, metrics), grads = grad_fn(state.trainable, micro, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.trainable, batch, key))
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, inputs)
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
