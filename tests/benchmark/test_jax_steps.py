"""The benchmark's trainer config carries the setup's choices, so the trainer's checks judge what will run."""

from __future__ import annotations

import pytest

from contextblip_jax.benchmark.jax_steps import Setup, run_config


def test_a_bf16_cudnn_setup_gets_a_config_the_checks_accept():
    config = run_config(Setup(preset="tiny", stage="finetune", train=True, dtype="bfloat16", attention="cudnn"))
    assert (config.dtype, config.attention) == ("bfloat16", "cudnn")


def test_a_float32_cudnn_setup_is_refused_by_the_trainers_check():
    with pytest.raises(ValueError, match="cudnn"):
        run_config(Setup(preset="tiny", stage="finetune", train=True, dtype="float32", attention="cudnn"))
