"""The trainer end to end on the tiny config: damaged checkpoints, NaN stop, bad input, sharding, stages. (Exact
resume after SIGTERM and SIGKILL: tests/reliability/test_kills.py.)

Runs happen in this process (`train.train`) unless a separate process is the point: several processes, 8
simulated devices, and the command lines themselves.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from contextblip_jax import runconfig, train
from contextblip_jax.checkpoints import weights
from contextblip_jax.data import synthetic
from contextblip_jax.evaluation.evaluators import ImageCodeEvaluator
from contextblip_jax.evaluation.scorer import mmvp_accuracy, scorer
from contextblip_jax.training.telemetry import read_metrics
from tests.runs import ROOT, device_env, run_config, train_command


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> str:
    """A 2-step fine-tuning run, shared by the tests that only need some checkpoint."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    result = train.train(run_config(data_root, total_steps=2), workdir)
    assert result["best"]["valid"]["step"] == 2
    return workdir


def run(command: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=False, timeout=timeout)


def train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"}


def test_the_summary_names_the_best_row_the_keeper_kept_under_any_criterion(tmp_path, data_root):
    """With `best.mode=min`, and over a resume, the summary names the row `W/best.json` names: the lowest
    accuracy of every evaluation of the run (the first of equal ones), including those before the resume. (Validation
    rows carry no loss, so the criterion that differs from the default is accuracy minimised.)"""
    workdir = str(tmp_path / "w")
    train.train(run_config(data_root, total_steps=2, eval_every=1, best__mode="min"), workdir)
    result = train.train(run_config(data_root, total_steps=4, eval_every=1, best__mode="min"), workdir)
    rows = [r for r in read_metrics(workdir) if r["split"] == "valid"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    lowest = min(rows, key=lambda r: r["acc"])
    with open(os.path.join(workdir, "best.json")) as f:
        kept = json.load(f)
    assert kept["step"] == lowest["step"]
    assert result["best"] == {"valid": kept["row"]}


@pytest.mark.long
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, data_root, caplog):
    """Checkpoints 1 and 2, then step 2's arrays truncated: the same run resumes from step 1, sets step 2 aside
    for inspection, and computes step 2 again to the same loss bit for bit."""
    caplog.set_level(logging.INFO)
    workdir = str(tmp_path / "w")
    config = run_config(data_root, total_steps=2, log_every=1, checkpoint_every=1, keep_checkpoints=3, eval__splits=())
    train.train(config, workdir)
    first = train_losses(workdir)
    for path in (tmp_path / "w" / "checkpoints" / "2").glob("state/**/d/*"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    config.total_steps = 3
    train.train(config, workdir)
    again = train_losses(workdir)
    assert any("checkpoint 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert any("resumed from step 1" in r.getMessage() for r in caplog.records)
    assert sorted(again) == [1, 2, 3] and again[2] == first[2]
    assert [p for p in os.listdir(tmp_path / "w" / "checkpoints") if p.startswith("damaged-2-")]


@pytest.mark.long
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
    config = run_config(
        data_root, total_steps=30, log_every=1, checkpoint_every=1, optimizer__lr=1e30, optimizer__head_lr=1e30,
        optimizer__warmup_steps=0,
    )  # fmt: skip
    with pytest.raises(train.NonFiniteLoss, match="loss is") as raised:
        train.train(config, str(tmp_path / "nan"))
    message = str(raised.value)
    bad_step = int(message.split(" at step ")[1].split(";")[0])
    good = sorted(int(p) for p in os.listdir(tmp_path / "nan" / "checkpoints") if p.isdigit())
    assert good and max(good) == bad_step - 1 and f"last good checkpoint is step {bad_step - 1}" in message


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"mesh": (3, 1, 1)}, ValueError, "needs 3 devices"),
        ({"stage": "warmup"}, ValueError, "unknown stage 'warmup'"),
        ({"data__root": "/nonexistent/imagecode", "data__synthetic": 0}, FileNotFoundError, "does not exist"),
        ({"grad_accum_steps": 3}, ValueError, "not divisible by grad_accum_steps 3"),
        ({"remat": ("decoder",)}, ValueError, "remat towers"),
    ],
)
def test_bad_input_is_named_before_anything_is_written(tmp_path, data_root, overrides, error, message):
    with pytest.raises(error, match=message):
        train.train(run_config(data_root, total_steps=2, **overrides), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_zeroshot_does_not_train(tmp_path, data_root):
    with pytest.raises(ValueError, match="zeroshot stage does not train"):
        train.train(run_config(data_root, stage="zeroshot"), str(tmp_path / "zs"))


@pytest.mark.long
def test_resuming_with_another_architecture_names_the_fields(trained, data_root):
    config = run_config(data_root, total_steps=3, model__blip__text__mlp_dim=48)
    with pytest.raises(ValueError, match=r"another architecture: blip\.text\.mlp_dim: checkpoint 64, config 48"):
        train.train(config, trained)


@pytest.mark.long
def test_mmvp_pair_accuracy_per_category(tmp_path, trained, data_root):
    from tests.data.test_mmvp import miniature

    (tmp_path / "mmvp").mkdir()
    config = run_config(data_root)
    scoring, root = scorer(config, trained), miniature(str(tmp_path / "mmvp"))
    scores = mmvp_accuracy(config, scoring, root)
    categories = [k for k in scores if k not in ("all", "mean")]
    assert len(categories) == 2 and all(scores[c] in (0.0, 0.5, 1.0) for c in categories)
    assert scores["mean"] == sum(scores[c] for c in categories) / 2
    config.eval.group_by_set = False  # each statement encodes the pair's images again: the same accuracies
    assert mmvp_accuracy(config, scoring, root) == scores


@pytest.mark.long
def test_evaluate_command_prints_accuracy_and_writes_the_leaderboard(trained, data_root):
    common = [
        sys.executable, "-m", "contextblip_jax.evaluate", "--config=configs/synthetic.py:variant=tiny",
        f"--workdir={trained}", f"--config.data.root={data_root}", "--config.eval.batch_size=8",
        "--config.init=/moved/away/weights",  # the run's own checkpoint is scored: its starting point is not read
    ]  # fmt: skip
    valid = run([*common, "--split=valid"])
    assert valid.returncode == 0, valid.stderr[-2000:]
    metrics = json.loads(valid.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["split"] == "valid" and 0 <= metrics["acc"] <= 1
    logged = [r for r in read_metrics(trained) if r["split"] == "valid"][-1]
    assert metrics["acc"] == logged["acc"]  # the command scores what the trainer scored at its last step
    by_kind = metrics["acc_by_kind"]  # generated data: the accuracy of each scene kind the split holds
    assert set(by_kind) <= set(synthetic.KINDS) and by_kind
    assert min(by_kind.values()) <= metrics["acc"] <= max(by_kind.values())  # overall is their weighted mean
    test = run([*common, "--split=test"])
    assert test.returncode == 0, test.stderr[-2000:]
    with open(json.loads(test.stdout.strip().splitlines()[-1])["leaderboard"]) as f:
        board = json.load(f)
    with open(os.path.join(data_root, "test_data_unlabeled.json")) as f:
        expected = json.load(f)
    assert list(board) == list(expected)
    for name, texts in expected.items():
        assert len(board[name]) == len(texts) and all(0 <= i < 10 for i in board[name])


def step_one_params(workdir: str) -> dict[str, np.ndarray]:
    from contextblip_jax.checkpoints.run_state import RunCheckpoints

    checkpoints = RunCheckpoints(workdir)
    try:
        return checkpoints.restore_params(1)
    finally:
        checkpoints.close()


@pytest.mark.long
def test_sharded_step_equals_one_device(tmp_path, data_root, eight_devices):
    """One train step on 8 simulated devices, meshes (8,1,1), (2,4,1), (2,2,2): loss and updated parameters of
    the 1-device run within 1e-5."""
    single = str(tmp_path / "single")
    train.train(run_config(data_root, total_steps=1, log_every=1, eval__splits=()), single)
    loss, params = train_losses(single)[1], step_one_params(single)
    for mesh, workdir in eight_devices.items():
        assert abs(train_losses(workdir)[1] - loss) <= 1e-5 * max(1.0, abs(loss)), mesh
        other = step_one_params(workdir)
        for name, value in params.items():
            np.testing.assert_allclose(other[name], value, atol=1e-5, err_msg=f"{mesh} {name}")


@pytest.mark.long
def test_two_processes_match_one_process_with_eight_devices(tmp_path, data_root, eight_devices):
    """2 processes x 4 CPU devices (gloo collectives) reproduce the 1-process 8-device losses over 3 steps."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = device_env(4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    flags = ("--config.total_steps=3", "--config.log_every=1", "--config.mesh=(8,1,1)", "--config.eval.splits=()",
             f"--coordinator=localhost:{port}", "--num_processes=2")  # fmt: skip
    commands = [train_command(tmp_path / "multi", data_root, *flags, f"--process_id={i}") for i in range(2)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, **pipes) for command in commands]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    expected, got = train_losses(eight_devices["(8,1,1)"]), train_losses(tmp_path / "multi")
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])


@pytest.mark.long
def test_all_stages_chain_on_synthetic_data(tmp_path, data_root):
    """stage 1 -> zero-shot evaluation -> 2a -> 2b, each initialised from the previous one's checkpoint."""
    s1, s2a, s2b = (str(tmp_path / name) for name in ("s1", "s2a", "s2b"))
    train.train(run_config(data_root, stage="pretrain", total_steps=2, log_every=1), s1)
    assert {"itm", "tmim"} <= set(read_metrics(s1)[-1])
    zeroshot = run_config(data_root, stage="zeroshot", init=s1)
    scoring = scorer(zeroshot, str(tmp_path / "zs"))
    row = ImageCodeEvaluator(runconfig.data_config(zeroshot, train=False), "valid", scoring.mesh).run(
        scoring.predict, 0
    )
    assert 0 <= row["acc"] <= 1 and row["descriptions"] > 0
    assert weights.initial_model(run_config(data_root, init=s1))[1] == f"step 2 of {s1} (latest: it has no best.json)"
    train.train(run_config(data_root, total_steps=2, init=s1), s2a)
    train.train(run_config(data_root, stage="context", total_steps=2, init=s2a), s2b)
    _, adapted, _ = weights.run_params(s2a)
    _, first, _ = weights.run_params(s1)
    _, final, _ = weights.run_params(s2b)
    np.testing.assert_array_equal(adapted["tmim.head.kernel"], first["tmim.head.kernel"])  # 2a leaves TMIM alone
    np.testing.assert_array_equal(final["head.proj.kernel"], adapted["head.proj.kernel"])  # 2a's head, frozen
    assert not np.array_equal(final["context.position"], adapted["context.position"])


@pytest.mark.long
def test_predict_command_ranks_a_set(trained, data_root):
    folder = os.path.join(data_root, "image-sets", sorted(os.listdir(os.path.join(data_root, "image-sets")))[0])
    result = run(
        [sys.executable, "-m", "contextblip_jax.predict", f"--workdir={trained}", f"--images={folder}",
         "--text=two blue circles on the left", "--stage=finetune"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    ranking = json.loads(result.stdout)["ranking"]
    assert sorted(r["index"] for r in ranking) == list(range(10))
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    texts = ["two blue circles on the left", "a red square at the top"]
    both = run(
        [sys.executable, "-m", "contextblip_jax.predict", f"--workdir={trained}", f"--images={folder}",
         *(f"--text={text}" for text in texts), "--stage=finetune"],
    )  # fmt: skip
    assert both.returncode == 0, both.stderr[-2000:]
    results = json.loads(both.stdout)
    assert [r["text"] for r in results] == texts
    assert [r["index"] for r in results[0]["ranking"]] == [r["index"] for r in ranking]


def test_the_done_line_names_only_the_files_the_run_wrote(tmp_path):
    """A run that never evaluated has no curve and no best file: the last line a person reads lists what is there."""
    from contextblip_jax.train import _summary

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints").mkdir()
    line = _summary({"best": {}}, str(tmp_path))
    assert line == f"done: no evaluation. In {tmp_path}: metrics.jsonl, checkpoints/"


@pytest.mark.long
def test_grouped_batches_train_with_micro_batches_and_report_the_filled_slots(tmp_path, data_root):
    """Whole-set batches (`data.group_by_set`) through the trainer, cut into 2 micro-batches of whole groups."""
    workdir = str(tmp_path / "w")
    config = run_config(
        data_root, total_steps=3, data__group_by_set=True, grad_accum_steps=2, eval_every=0, log_every=1
    )
    train.train(config, workdir)
    rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 < r["filled"] <= 1 for r in rows)
