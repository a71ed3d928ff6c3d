"""The SLURM launcher on a real single-node cluster: 2 tasks x 4 CPU devices reproduce the 1-process 8-device
losses, and the same job, cancelled mid-run, resumes from its checkpoint when submitted again (one job serves
both checks: each job costs a minute of start-up and compilation); every `sbatch` line of the README and of
docs/launch.md is accepted by the scheduler (the node has 8 placeholder GPUs)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from contextblip_jax.training.telemetry import read_metrics
from tests.launch.local_slurm import LocalSlurm, Unavailable
from tests.runs import FAST, ROOT, SETS

pytestmark = pytest.mark.long

SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = LocalSlurm(str(tmp_path_factory.mktemp("slurm")), gpus=8)
    try:
        slurm.start()
    except Unavailable as error:
        slurm.stop()
        pytest.skip(f"no local SLURM cluster: {error}")
    yield slurm
    slurm.stop()


def trainer_flags(workdir, data_root: str, *extra: str) -> list[str]:
    fast = [f"--config.{key}={value}" for key, value in FAST.items()]
    return [
        "--config=configs/synthetic.py:variant=tiny", f"--workdir={workdir}", f"--config.data.root={data_root}",
        f"--config.data.synthetic={SETS}", "--config.mesh=(8,1,1)", "--config.log_every=1", "--config.eval.splits=()",
        *fast, *extra,
    ]  # fmt: skip


def submit(cluster: LocalSlurm, output: str, flags: list[str]) -> int:
    return cluster.submit(
        "--ntasks=2", "--cpus-per-task=1", f"--output={output}", SBATCH, *flags,
        env={"CPU_DEVICES": "4", "PYTHON": sys.executable}, cwd=ROOT,
    )  # fmt: skip


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"}


def test_two_tasks_match_eight_devices_and_a_cancelled_job_resumes(cluster, tmp_path, data_root, eight_devices):
    """One job of 2 tasks x 4 devices: its first 3 losses are the 1-process 8-device run's; `scancel` makes both
    tasks save the same step and exit; the job submitted again resumes from that checkpoint."""
    workdir, first = tmp_path / "w", str(tmp_path / "first.out")
    long_run = ("--config.total_steps=100000", "--config.checkpoint_every=100000")
    job = submit(cluster, first, trainer_flags(workdir, data_root, *long_run))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(losses(workdir)) < 3:
        assert cluster.state(job) in ("PENDING", "CONFIGURING", "RUNNING"), read(first)[-3000:]
        time.sleep(1)
    assert cluster.run("scancel", str(job)).returncode == 0
    cluster.wait_until_done(job, timeout=300)
    log = read(first)
    assert "2 tasks" in log, log[-3000:]
    expected, got = losses(eight_devices["(8,1,1)"]), losses(workdir)
    for step in (1, 2, 3):
        print(f"step {step}: 2 SLURM tasks x 4 devices {got[step]!r}, 1 process x 8 devices {expected[step]!r}")
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])
    stopped = [int(s) for s in re.findall(r'"preempted_at": (\d+)', log)]
    assert len(stopped) == 1, log[-3000:]  # process 0's summary; a step the tasks disagreed on would hang them
    step = stopped[0]
    assert sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == [step]

    second = str(tmp_path / "second.out")
    job = submit(cluster, second, trainer_flags(workdir, data_root, f"--config.total_steps={step + 2}"))
    cluster.wait_until_done(job, timeout=900)
    log = read(second)
    assert f"resumed from step {step}" in log, log[-3000:]
    assert sorted(losses(workdir)) == list(range(1, step + 3))


def readme_sbatch_commands() -> list[tuple[dict[str, str], list[str]]]:
    """(environment, sbatch arguments) of every line of the README and of docs/launch.md that runs sbatch,
    `VAR=value` prefixes included (a line both hold is checked once)."""
    lines = []
    for document in ("README.md", "docs/launch.md"):
        with open(os.path.join(ROOT, document)) as f:
            lines += [line for line in f.read().replace("\\\n", " ").splitlines() if line not in lines]
    commands = []
    for line in lines:
        if re.match(r"\s*(\w+=\S+\s+)*sbatch\s", line):
            words = shlex.split(line.split("#")[0])
            at = words.index("sbatch")
            commands.append((dict(word.split("=", 1) for word in words[:at]), words[at + 1 :]))
    return commands


def test_every_readme_sbatch_line_is_accepted(cluster):
    """`sbatch --test-only` parses the options and the script's own `#SBATCH` lines and asks the scheduler whether
    the request fits, without running anything. The local cluster has one node, so `--nodes` becomes 1: what is
    checked is each option and the per-node request (tasks, GPUs) against a node with 8 GPUs."""
    commands = readme_sbatch_commands()
    assert len(commands) >= 3, commands
    for env, arguments in commands:
        arguments = [re.sub(r"^--nodes=\d+$", "--nodes=1", word) for word in arguments if word != "..."]
        result = subprocess.run(
            ["sbatch", "--test-only", *arguments], env={**cluster.env, **env}, cwd=ROOT, capture_output=True,
            text=True, check=False, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0 and "to start at" in result.stderr, (arguments, result.stderr)
    too_big = subprocess.run(
        ["sbatch", "--test-only", "--gpus-per-node=9", SBATCH], env=cluster.env, capture_output=True, text=True
    )
    assert too_big.returncode != 0 and "not available" in too_big.stderr  # the check can fail
