"""`weights.initial_model`: where a run's model comes from, and a clear error when `init` is not there."""

from __future__ import annotations

import pytest

from contextblip_jax import runconfig
from contextblip_jax.checkpoints import weights
from tests.runs import run_config


def test_a_missing_init_is_named_when_the_model_is_built(tmp_path):
    config = runconfig.prepare(run_config(str(tmp_path), init=str(tmp_path / "moved")), data=False, weights=False)
    with pytest.raises(FileNotFoundError, match=f"init {tmp_path / 'moved'} does not exist"):
        weights.initial_model(config)


def test_no_init_is_a_random_model():
    config = runconfig.prepare(run_config("unused"), data=False, weights=False)
    assert weights.initial_model(config)[1] == "random initialisation"
