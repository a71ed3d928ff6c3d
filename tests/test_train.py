"""The trainer end to end on a tiny config: exact resume, preemption, NaN stop, bad input, sharding, stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from contextblip_jax import run
from contextblip_jax.telemetry import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.blip.vision.width=32",
    "--config.model.blip.vision.depth=2",
    "--config.model.blip.vision.num_heads=2",
    "--config.model.blip.vision.mlp_dim=64",
    "--config.model.blip.vision.image_size=32",
    "--config.model.blip.vision.patch_size=8",
    "--config.model.blip.text.width=32",
    "--config.model.blip.text.depth=1",
    "--config.model.blip.text.num_heads=2",
    "--config.model.blip.text.mlp_dim=64",
    "--config.model.blip.text.max_positions=24",
    "--config.model.blip.text.encoder_width=32",
    "--config.model.blip.embed_dim=16",
    "--config.model.tmim.decoder_heads=2",
    "--config.model.tmim.decoder_mlp_dim=64",
    "--config.model.context.num_heads=2",
    "--config.model.context.mlp_dim=64",
    "--config.data.image_size=32",
    "--config.data.max_text_length=16",
    "--config.data.batch_size=8",
    "--config.eval.batch_size=8",
    "--config.eval_every=0",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    from contextblip_jax.data import synthetic

    synthetic.generate(root, seed=0, num_train_sets=12, num_valid_sets=4, num_test_sets=2, image_size=48)
    return root


def train_cmd(workdir, data_root: str, *extra: str, stage: str = "finetune") -> list[str]:
    return [
        sys.executable, "-m", "contextblip_jax.train", f"--config=configs/synthetic.py:stage={stage}",
        f"--workdir={workdir}", f"--config.data.root={data_root}", "--config.data.synthetic=12", *TINY, *extra,
    ]  # fmt: skip


def train(workdir, data_root: str, *extra: str, env: dict | None = None, stage: str = "finetune"):
    return subprocess.run(
        train_cmd(workdir, data_root, *extra, stage=stage), cwd=ROOT, capture_output=True, text=True,
        env=env, check=False, timeout=600,
    )  # fmt: skip


def train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"}


def test_exact_resume_gives_bitwise_identical_losses(tmp_path, data_root):
    common = ("--config.log_every=1", "--config.checkpoint_every=20")
    straight = train(tmp_path / "straight", data_root, "--config.total_steps=40", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train(tmp_path / "resumed", data_root, "--config.total_steps=20", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(tmp_path / "resumed", data_root, "--config.total_steps=40", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 20" in second.stderr
    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 41))
    for step in range(21, 41):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])  # bitwise
    assert len({expected[s] for s in range(21, 41)}) > 1  # the losses really move


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, data_root):
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        train_cmd(workdir, data_root, "--config.total_steps=100000", "--config.log_every=1",
                  "--config.checkpoint_every=100000"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and len(train_losses(workdir)) < 3:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    interrupted = json.loads(stdout.strip().splitlines()[-1])["preempted_at"]
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert steps == [interrupted] and interrupted >= 3
    rerun = train(workdir, data_root, f"--config.total_steps={interrupted + 2}", "--config.log_every=1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {interrupted}" in rerun.stderr
    assert max(train_losses(workdir)) == interrupted + 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
    result = train(tmp_path / "nan", data_root, "--config.total_steps=30", "--config.log_every=1",
                   "--config.checkpoint_every=1", "--config.optimizer.lr=1e30", "--config.optimizer.head_lr=1e30",
                   "--config.optimizer.warmup_steps=0")  # fmt: skip
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("error: loss is")][-1]
    bad_step = int(message.split(" at step ")[1].split(";")[0])
    good = sorted(int(p) for p in os.listdir(tmp_path / "nan" / "checkpoints") if p.isdigit())
    assert good and max(good) == bad_step - 1 and f"last good checkpoint is step {bad_step - 1}" in message


EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("--config.mesh=(3,1,1)",), "needs 3 devices"),
        (("--config.mesh=(8,1,1)", "--config.data.batch_size=12"), "not divisible by the data-parallel size 8"),
        (("--config.stage=warmup",), "unknown stage"),
        (("--config.data.root=/nonexistent/imagecode", "--config.data.synthetic=0"), "does not exist"),
    ],
)
def test_bad_input_is_named_before_compilation(tmp_path, data_root, overrides, message):
    result = train(
        tmp_path / "bad", data_root, "--config.total_steps=2", *overrides, env={**os.environ, **EIGHT_DEVICES}
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_resuming_with_another_architecture_names_the_fields(tmp_path, data_root):
    assert train(tmp_path / "w", data_root, "--config.total_steps=1").returncode == 0
    result = train(tmp_path / "w", data_root, "--config.total_steps=2", "--config.model.blip.text.mlp_dim=48")
    assert result.returncode != 0
    assert "another architecture: blip.text.mlp_dim: checkpoint 64, config 48" in result.stderr, result.stderr[-2000:]


def test_mmvp_pair_accuracy_per_category(tmp_path, data_root):
    from tests.data.test_mmvp import miniature

    assert train(tmp_path / "run", data_root, "--config.total_steps=1").returncode == 0
    (tmp_path / "mmvp").mkdir()
    root = miniature(str(tmp_path / "mmvp"))
    result = subprocess.run(
        [sys.executable, "-m", "contextblip_jax.evaluate", "--config=configs/synthetic.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data.root={data_root}", *TINY, "--split=mmvp",
         f"--mmvp_root={root}"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    categories = [k for k in scores if k not in ("split", "step", "all", "mean")]
    assert len(categories) == 2 and all(scores[c] in (0.0, 0.5, 1.0) for c in categories)
    assert scores["mean"] == sum(scores[c] for c in categories) / 2 and scores["step"] == 1


def test_sharded_step_equals_one_device(tmp_path, data_root):
    """One train step on 8 simulated devices, meshes (8,1,1), (2,4,1), (2,2,2): loss and updated parameters of
    the 1-device run within 1e-5."""
    env = {**os.environ, **EIGHT_DEVICES}
    results = {}
    for mesh in ("(1,1,1)", "(8,1,1)", "(2,4,1)", "(2,2,2)"):
        workdir = tmp_path / mesh.strip("()").replace(",", "")
        extra = ("--config.total_steps=1", "--config.log_every=1", f"--config.mesh={mesh}")
        result = train(workdir, data_root, *extra, env=env if mesh != "(1,1,1)" else None)
        assert result.returncode == 0, result.stderr[-3000:]
        _, params, _ = run.previous_run(str(workdir))
        results[mesh] = (train_losses(workdir)[1], params)
    loss, params = results["(1,1,1)"]
    for mesh, (other_loss, other_params) in results.items():
        assert abs(other_loss - loss) <= 1e-5 * max(1.0, abs(loss)), mesh
        for name, value in params.items():
            np.testing.assert_allclose(other_params[name], value, atol=1e-5, err_msg=f"{mesh} {name}")


def test_all_stages_chain_on_synthetic_data(tmp_path, data_root):
    """stage 1 -> zero-shot evaluation -> 2a -> 2b, each initialised from the previous one's checkpoint."""
    steps = ("--config.total_steps=2", "--config.log_every=1")
    stage1 = train(tmp_path / "s1", data_root, *steps, stage="pretrain")
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    assert {"itm", "tmim"} <= set(read_metrics(str(tmp_path / "s1"))[-1])
    zeroshot = subprocess.run(
        [sys.executable, "-m", "contextblip_jax.evaluate", "--config=configs/synthetic.py:stage=zeroshot",
         f"--workdir={tmp_path / 'zs'}", f"--config.data.root={data_root}", f"--config.init={tmp_path / 's1'}",
         *TINY],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert zeroshot.returncode == 0, zeroshot.stderr[-3000:]
    assert 0 <= json.loads(zeroshot.stdout.strip().splitlines()[-1])["acc"] <= 1
    finetune = train(tmp_path / "s2a", data_root, *steps, f"--config.init={tmp_path / 's1'}")
    assert finetune.returncode == 0 and f"the latest checkpoint of {tmp_path / 's1'}" in finetune.stderr
    context = train(tmp_path / "s2b", data_root, *steps, f"--config.init={tmp_path / 's2a'}", stage="context")
    assert context.returncode == 0, context.stderr[-3000:]
    _, adapted, _ = run.previous_run(str(tmp_path / "s2a"))
    _, final, _ = run.previous_run(str(tmp_path / "s2b"))
    np.testing.assert_array_equal(final["head.proj.kernel"], adapted["head.proj.kernel"])  # 2a's head, frozen
    assert not np.array_equal(final["context.position"], adapted["context.position"])


def test_two_processes_match_one_process_with_eight_devices(tmp_path, data_root):
    """2 processes x 4 CPU devices (gloo collectives) reproduce the 1-process 8-device losses over 3 steps."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    steps = ("--config.total_steps=3", "--config.log_every=1", "--config.mesh=(8,1,1)")
    single = train(tmp_path / "single", data_root, *steps, env={**os.environ, **EIGHT_DEVICES})
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}  # fmt: skip
    processes = [
        subprocess.Popen(
            train_cmd(
                tmp_path / "multi",
                data_root,
                *steps,
                f"--coordinator=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    expected, got = train_losses(tmp_path / "single"), train_losses(tmp_path / "multi")
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])


def test_predict_ranks_a_set(tmp_path, data_root):
    assert train(tmp_path / "run", data_root, "--config.total_steps=1").returncode == 0
    folder = os.path.join(data_root, "image-sets", sorted(os.listdir(os.path.join(data_root, "image-sets")))[0])
    result = subprocess.run(
        [sys.executable, "-m", "contextblip_jax.predict", f"--workdir={tmp_path / 'run'}", f"--images={folder}",
         "--text=two blue circles on the left", "--stage=finetune"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    ranking = json.loads(result.stdout)["ranking"]
    assert sorted(r["index"] for r in ranking) == list(range(10))
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
