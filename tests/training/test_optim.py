"""Schedules, parameter groups and the two weight-decay flavours, against values computed by hand."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training import optim

SCHEDULE = dict(warmup_steps=10, warmup_init=0.1, decay_per_epoch=0.5, steps_per_epoch=20, min_lr=0.2)


@pytest.mark.parametrize(
    ("step", "rate"),
    [
        (0, 0.1),  # warm-up starts at warmup_init
        (5, 0.55),  # halfway: 0.1 + 0.9 * 5/10
        (9, 0.91),
        (10, 1.0),  # warm-up over: the peak, still epoch 0
        (19, 1.0),  # last step of epoch 0
        (20, 0.5),  # epoch 1: peak * 0.5
        (39, 0.5),
        (40, 0.25),  # epoch 2
        (60, 0.2),  # epoch 3: 0.125 is under the floor
    ],
)
def test_schedule_at_warm_up_and_epoch_boundaries(step, rate):
    assert float(optim.schedule(1.0, **SCHEDULE)(step)) == pytest.approx(rate, rel=1e-6)


def test_no_warm_up_starts_at_the_peak():
    rate = optim.schedule(2.0, **{**SCHEDULE, "warmup_steps": 0})
    assert float(rate(0)) == pytest.approx(2.0) and float(rate(20)) == pytest.approx(1.0)


def optimizer_config(name: str) -> ml_collections.ConfigDict:
    config = base_config().optimizer
    config.update(name=name, b1=0.9, b2=0.999, eps=0.1, weight_decay=0.5, lr=0.1, head_lr=0.3, warmup_steps=0)
    return config


PARAMS = {"blip.w": jnp.array([1.0, -2.0]), "head.proj.kernel": jnp.array([1.0, -2.0])}
GRADS = {"blip.w": jnp.array([0.5, 0.5]), "head.proj.kernel": jnp.array([0.5, 0.5])}


def first_update(name: str) -> dict[str, np.ndarray]:
    tx = optim.build_optimizer(optimizer_config(name), PARAMS, steps_per_epoch=100)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    return {k: np.asarray(v) for k, v in updates.items()}


def test_adam_adds_the_decay_to_the_gradient_before_adam():
    """torch.optim.Adam(weight_decay): g' = g + wd·w = [1.0, -0.5]; the first bias-corrected Adam step is
    -lr · g' / (|g'| + eps) = -0.1 · [1/1.1, -0.5/0.6]."""
    updates = first_update("adam")
    np.testing.assert_allclose(updates["blip.w"], [-0.1 / 1.1, 0.05 / 0.6], rtol=1e-5)
    np.testing.assert_allclose(updates["head.proj.kernel"], [-0.3 / 1.1, 0.15 / 0.6], rtol=1e-5)  # head rate 0.3


def test_adamw_decays_the_weights_apart_from_adam():
    """AdamW: -lr · (g / (|g| + eps) + wd·w) = -0.1 · ([0.5/0.6, 0.5/0.6] + [0.5, -1.0]). The second entry
    cancels (0.83 - 1.0), so it is compared in absolute terms at float32 resolution."""
    updates = first_update("adamw")
    np.testing.assert_allclose(updates["blip.w"], [-0.1 * (0.5 / 0.6 + 0.5), -0.1 * (0.5 / 0.6 - 1.0)], atol=1e-6)


def test_head_pattern_selects_the_second_group():
    labels = optim.group_labels({"head.proj.kernel": 0, "blip.head.x": 0, "context.position": 0}, r"^head\.")
    assert labels == {"head.proj.kernel": "head", "blip.head.x": "base", "context.position": "base"}
    rates = optim.learning_rates(optimizer_config("adam"), steps_per_epoch=100, step=0)
    assert rates == pytest.approx({"lr": 0.1, "lr_head": 0.3})


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="sgd"):
        optim.build_optimizer(optimizer_config("sgd"), PARAMS, steps_per_epoch=1)
