"""The pure train and evaluation steps. The model is split into a graph (static) and flat parameter dicts
outside jit; inside, `merge` rebuilds it. Trainable and frozen parameters are separate dicts, so the
optimizer state covers only what trains and frozen weights cannot change by construction.

All randomness (dropout, TMIM masks, hard negatives) comes from the run's key folded with the step, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from contextblip_jax import losses
from contextblip_jax.models.contextblip import ContextBLIP, dotted_path, trainable_filter

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


def split_model(model: ContextBLIP, trainable_pattern: str) -> tuple[ModelSpec, Params, Params]:
    """(spec, trainable params, frozen params) with dotted names."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    paths = {dotted_path(path): path for path, _ in flat}
    wanted = {dotted_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(trainable_pattern)))}
    trainable = {name: var[...] for name, var in ((dotted_path(p), v) for p, v in flat) if name in wanted}
    frozen = {name: var[...] for name, var in ((dotted_path(p), v) for p, v in flat) if name not in wanted}
    return ModelSpec(graphdef, rest, paths), trainable, frozen


def stage_loss(stage: str, loss_config: Any, reduction: str = "sum") -> Callable[..., tuple[jax.Array, dict]]:
    """`loss(model, batch, key) -> (scalar, metrics)` for a training stage."""

    def pretrain(model: ContextBLIP, batch: Mapping[str, jax.Array], key: jax.Array):
        terms = model.pretrain_losses(
            batch["images"], batch["input_ids"], batch["attention_mask"], key, loss_config.temperature or None
        )
        total = loss_config.itm * terms["itm"] + loss_config.tmim * terms["tmim"]
        if "mask_prediction" in terms:
            total = total + loss_config.mask_prediction * terms["mask_prediction"]
        return total, terms

    def candidates(model: ContextBLIP, batch: Mapping[str, jax.Array], key: jax.Array):
        args = (batch["images"], batch["input_ids"], batch["attention_mask"])
        if stage == "context":
            logits = model.context_logits(*args, batch["is_video"], rngs=nnx.Rngs(dropout=key))
        else:
            logits = model.finetune_logits(*args)
        correct = (jnp.argmax(logits, axis=-1) == batch["target"]).astype(jnp.float32)
        return losses.candidate_loss(logits, batch["target"], reduction), {"accuracy": correct.mean()}

    if stage == "pretrain":
        return pretrain
    if stage in ("finetune", "context"):
        return candidates
    raise ValueError(f"stage {stage!r} does not train")


def make_train_step(
    spec: ModelSpec,
    loss_fn: Callable[..., tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    seed: int,
    accum_steps: int = 1,
    sum_reduced: bool = True,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """One optimizer step over a global batch, accumulating gradients over `accum_steps` micro-batches.

    Losses summed over examples (candidate CE) add up across micro-batches; averaged ones (stage 1) average.
    """

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_of(trainable: Params, micro: Mapping[str, jax.Array], micro_key: jax.Array):
            return loss_fn(spec.merge(trainable, state.frozen), micro, micro_key)

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
            if not sum_reduced:
                loss, grads = loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
        return TrainState(state.step + 1, trainable, state.frozen, opt_state), metrics

    return step


def make_predict_step(spec: ModelSpec, stage: str) -> Callable[[Params, Params, Mapping[str, jax.Array]], jax.Array]:
    """Candidate scores [B, C] of a stage (zero-shot: ITM match probability; otherwise logits)."""

    def predict(trainable: Params, frozen: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
        model = spec.merge(trainable, frozen)
        args = (batch["images"], batch["input_ids"], batch["attention_mask"])
        if stage == "zeroshot":
            return model.zero_shot_scores(*args)
        if stage == "context":
            return model.context_logits(*args, batch["is_video"])
        return model.finetune_logits(*args)

    return predict
