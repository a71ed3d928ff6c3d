"""Optimizers and learning-rate schedules from `config.optimizer`, built with optax (the
authors' values: `configs/pretrain.yaml` for stage 1, `finetune_notf.py` for 2a, `finetune_context.py` for 2b).

Parameters live in flat `{dotted.path: array}` dicts, so parameter groups are regular expressions over the
keys: `head_pattern` selects a second group with its own peak rate (2a: 1e-4 for the head, 2e-6 elsewhere).
`adam` adds the weight decay to the gradient before Adam, as `torch.optim.Adam(weight_decay=...)` in the
authors' code; `adamw` decouples it, as BLIP's pre-training does. `clip_norm` > 0 first scales the whole
gradient down to that global norm: one spike (100x the usual norm) otherwise drives Adam's next dozen steps
the same way at full rate and inflates its second moment for a hundred more.

Imports: its own package (`training`) only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw")


def schedule(
    peak: float,
    *,
    warmup_steps: int,
    warmup_init: float,
    decay_per_epoch: float,
    steps_per_epoch: int,
    min_lr: float,
) -> optax.Schedule:
    """Linear warm-up from `warmup_init` to `peak`, then `peak · decay^epoch` (stepwise per epoch), floored."""

    def rate(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, jnp.float32)
        epoch = jnp.floor(step / max(steps_per_epoch, 1))
        decayed = jnp.maximum(peak * decay_per_epoch**epoch, min_lr)
        if warmup_steps <= 0:
            return decayed
        warm = warmup_init + (peak - warmup_init) * step / warmup_steps
        return jnp.where(step < warmup_steps, warm, decayed)

    return rate


def _one(config: Any, peak: float, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = schedule(
        peak,
        warmup_steps=config.warmup_steps,
        warmup_init=config.warmup_init,
        decay_per_epoch=config.decay_per_epoch,
        steps_per_epoch=steps_per_epoch,
        min_lr=config.min_lr,
    )
    adam = optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
    if config.name == "adam":
        return optax.chain(optax.add_decayed_weights(config.weight_decay), adam, optax.scale_by_learning_rate(lr))
    return optax.chain(adam, optax.add_decayed_weights(config.weight_decay), optax.scale_by_learning_rate(lr))


def group_labels(params: Mapping[str, Any], head_pattern: str) -> dict[str, str]:
    pattern = re.compile(head_pattern) if head_pattern else None
    return {name: "head" if pattern and pattern.search(name) else "base" for name in params}


def build_optimizer(config: Any, params: Mapping[str, Any], steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer over the flat trainable `params`; `config` is `config.optimizer`."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.name!r}")
    labels = group_labels(params, config.head_pattern)
    tx = optax.multi_transform(
        {"base": _one(config, config.lr, steps_per_epoch), "head": _one(config, config.head_lr, steps_per_epoch)},
        labels,
    )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), tx) if config.clip_norm else tx


def learning_rates(config: Any, steps_per_epoch: int, step: int) -> dict[str, float]:
    """The rate of each group at `step`, for the logs."""
    common = dict(
        warmup_steps=config.warmup_steps,
        warmup_init=config.warmup_init,
        decay_per_epoch=config.decay_per_epoch,
        steps_per_epoch=steps_per_epoch,
        min_lr=config.min_lr,
    )
    return {
        "lr": float(schedule(config.lr, **common)(step)),
        "lr_head": float(schedule(config.head_lr, **common)(step)),
    }
