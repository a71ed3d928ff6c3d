"""The best model of a run: which row wins, `W/best.json`, and that `evaluate` and `--config.init=W` take it."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax import runconfig, train
from contextblip_jax.checkpoints import best, weights
from contextblip_jax.evaluation.evaluators import ImageCodeEvaluator
from contextblip_jax.evaluation.scorer import scorer
from contextblip_jax.models.layers import dotted_path
from contextblip_jax.training.telemetry import read_metrics
from tests.runs import run_config


def params_of(step: int) -> dict:
    return {"w": jnp.full((3,), float(step))}


def test_a_better_row_replaces_the_best_and_others_do_not(tmp_path):
    keeper = best.BestKeeper(str(tmp_path), best.Criterion())
    offered = [
        ({"step": 1, "split": "valid", "acc": 0.3}, True),
        ({"step": 2, "split": "valid", "acc": 0.2}, False),
        ({"step": 3, "split": "test", "acc": 0.9}, False),  # another split does not compete
        ({"step": 4, "split": "valid", "acc": 0.3}, False),  # a tie keeps the earlier step
        ({"step": 5, "split": "valid", "acc": 0.5}, True),
        ({"step": 6, "split": "valid", "acc": math.nan}, False),
    ]
    for row, kept in offered:
        assert keeper.offer(row, lambda row=row: params_of(row["step"])) is kept, row
    keeper.close()
    record = best.read(str(tmp_path))
    assert (record["step"], record["value"], record["metric"], record["row"]["acc"]) == (5, 0.5, "acc", 0.5)
    store = best.BestParams(str(tmp_path))
    np.testing.assert_array_equal(store.restore_params(5)["w"], [5.0, 5.0, 5.0])
    store.close()


def test_min_mode_and_a_resumed_keeper_compares_with_the_recorded_best(tmp_path):
    criterion = best.Criterion(metric="loss", mode="min")
    keeper = best.BestKeeper(str(tmp_path), criterion)
    assert keeper.offer({"step": 1, "split": "valid", "loss": 2.0}, lambda: params_of(1))
    keeper.close()
    resumed = best.BestKeeper(str(tmp_path), criterion)
    assert not resumed.offer({"step": 2, "split": "valid", "loss": 3.0}, lambda: params_of(2))
    assert resumed.offer({"step": 3, "split": "valid", "loss": 1.0}, lambda: params_of(3))
    resumed.close()
    assert best.read(str(tmp_path))["step"] == 3


def test_bad_choices_and_metrics_are_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="'newest'"):
        runconfig.check_choice("newest")
    keeper = best.BestKeeper(str(tmp_path), best.Criterion(metric="f1"))
    with pytest.raises(ValueError, match="'f1'"):
        keeper.offer({"step": 1, "split": "valid", "acc": 0.5}, lambda: params_of(1))
    keeper.close()


def accuracy_of(config, workdir: str, *choice: str) -> tuple[int, float]:
    """(step, validation accuracy) of what `evaluate` scores, by default or with `--checkpoint=choice`."""
    scoring = scorer(config, workdir, *choice)
    evaluator = ImageCodeEvaluator(runconfig.data_config(config, train=False), "valid", scoring.mesh)
    return scoring.step, evaluator.run(scoring.predict, scoring.step)["acc"]


@pytest.mark.long
def test_evaluate_and_init_take_the_best_model_when_the_latest_is_worse(tmp_path, data_root):
    """Trains 4 steps evaluating at 2 and 4, then 2 more steps at a NaN learning rate with no evaluation: the
    latest model is NaN by construction, the best one is whichever of steps 2 and 4 scored higher."""
    workdir = str(tmp_path / "w")
    config = run_config(data_root, total_steps=4, eval_every=2, checkpoint_every=2)
    train.train(config, workdir)
    rows = {r["step"]: r["acc"] for r in read_metrics(workdir) if r["split"] == "valid"}
    best_step = max(rows, key=lambda step: (rows[step], -step))
    record = best.read(workdir)
    assert (record["step"], record["value"]) == (best_step, rows[best_step])

    ruined = run_config(data_root, total_steps=6, nan_check=False, eval__splits=(), optimizer__lr=math.nan)
    ruined.optimizer.head_lr = math.nan
    train.train(ruined, workdir)
    assert best.read(workdir) == record
    _, latest, latest_step = weights.run_params(workdir, "latest")
    assert latest_step == 6 and any(np.isnan(v).any() for v in latest.values())

    assert accuracy_of(config, workdir) == (best_step, rows[best_step])
    assert accuracy_of(config, workdir, str(best_step)) == (best_step, rows[best_step])
    assert accuracy_of(config, workdir, "latest")[0] == 6
    with pytest.raises(FileNotFoundError, match="step 5"):
        weights.run_params(workdir, "5")

    model, origin = weights.initial_model(run_config(data_root, stage="context", init=workdir))
    assert f"step {best_step} of {workdir} (best)" == origin
    _, kept, _ = weights.run_params(workdir, "best")
    flat = {dotted_path(path): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert all(np.array_equal(np.asarray(flat[name]), value) for name, value in kept.items())
