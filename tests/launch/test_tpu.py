"""The Cloud TPU launcher: every command `--dry-run` prints is accepted by the real gcloud CLI.

gcloud parses each command locally and, with no credentials (an empty configuration folder), stops at the account
check before anything reaches the network. A usage error (an unknown flag, a missing argument, an invalid choice)
would stop it earlier, with another message.
"""

from __future__ import annotations

import concurrent.futures
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCUMENTS = ("README.md", "docs/launch.md")
"""Where a user copies launcher lines from: each of their lines is checked."""
TPU = os.path.join(ROOT, "launch", "tpu.sh")
WHERE = ["--name=cb-test", "--zone=us-central2-b", "--project=cb-project"]
CASES = {
    "create a TPU VM": ["create", *WHERE, "--type=v4-8"],
    "create a spot TPU VM": ["create", *WHERE, "--type=v5litepod-16", "--spot"],
    "create a reserved TPU VM, own image": ["create", *WHERE, "--type=v5p-8", "--reserved", "--version=v2-alpha-tpuv5"],
    "create a queued resource": ["create", *WHERE, "--type=v6e-8", "--queued"],
    "create a spot queued resource, 2 slices": ["create", *WHERE, "--type=v5litepod-16", "--queued", "--spot",
                                                 "--slices=2"],
    "setup by copying": ["setup", *WHERE, "--type=v4-32"],
    "setup with a bucket": ["setup", *WHERE, "--type=v4-32", "--bucket=cb-bucket"],
    "setup by cloning, 2 slices": ["setup", *WHERE, "--type=v5litepod-16", "--queued", "--slices=2",
                                   "--repo=https://example.com/contextblip_jax.git", "--ref=v1"],
    "run and follow": ["run", *WHERE, "--type=v4-32", "--", "--config=configs/imagecode.py:stage=finetune",
                       "--workdir=/mnt/cb-bucket/runs/2a", "--config.data.root=/mnt/cb-bucket/imagecode"],
    "run detached on 2 slices": ["run", *WHERE, "--type=v5litepod-16", "--queued", "--slices=2", "--detach", "--",
                                 "--config=configs/imagecode.py", "--workdir=/mnt/cb-bucket/w"],
    "logs of worker 3": ["logs", *WHERE, "--type=v4-32", "--worker=3", "--no-follow"],
    "status": ["status", *WHERE, "--type=v4-32"],
    "status of a queued resource": ["status", *WHERE, "--type=v4-32", "--queued"],
    "delete": ["delete", *WHERE, "--type=v4-32"],
    "delete a queued resource": ["delete", *WHERE, "--type=v4-32", "--queued", "--slices=2"],
}  # fmt: skip


def readme_commands() -> dict[str, list[str]]:
    """Every `launch/tpu.sh ...` line of the README and of docs/launch.md (continuation lines joined), as launcher
    arguments."""
    commands = {}
    for document in DOCUMENTS:
        with open(os.path.join(ROOT, document)) as f:
            text = f.read().replace("\\\n", " ")
        lines = [line.strip() for line in text.splitlines() if line.strip().startswith("launch/tpu.sh ")]
        commands.update({f"{document}: {line}": shlex.split(line)[1:] for line in lines})
    return commands


USAGE_ERRORS = ("unrecognized arguments", "is required", "Invalid choice", "argument ", "Invalid value")
EXPECTED_STOP = "You do not currently have an active account selected"


def dry_run(args: list[str]) -> list[str]:
    result = subprocess.run([TPU, "--dry-run", *args], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.long
def test_every_printed_command_passes_gclouds_parser(tmp_path):
    """The commands of every case and of every README line, each run through gcloud (a few at a time: each gcloud
    start costs a second of CPU)."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("the Google Cloud CLI (gcloud) is not installed")
    cases = {**CASES, **readme_commands()}
    assert len(cases) > len(CASES) + 10  # the README's commands are part of the check
    lines = {line: name for name, args in cases.items() for line in dry_run(args)}
    assert all(line.startswith("gcloud ") for line in lines)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }

    def parse(line: str) -> subprocess.CompletedProcess:
        return subprocess.run([gcloud, *shlex.split(line)[1:]], capture_output=True, text=True, env=env, check=False,
                              timeout=120)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(lines, pool.map(parse, lines), strict=True))
    for line, result in results.items():
        context = f"{lines[line]}: {line}\n{result.stderr[-1500:]}"
        assert result.returncode != 0, context  # nothing can succeed without credentials
        assert EXPECTED_STOP in result.stderr, context
        assert not any(error in result.stderr for error in USAGE_ERRORS), context
    assert not (tmp_path / ".ssh").exists()  # stopped before making ssh keys


def test_dry_run_prints_what_each_subcommand_does():
    create = dry_run(CASES["create a spot queued resource, 2 slices"])
    assert create == [
        "gcloud compute tpus queued-resources create cb-test --zone=us-central2-b --project=cb-project "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=cb-test "
        "--spot"
    ]
    run = dry_run(CASES["run detached on 2 slices"])
    assert [shlex.split(line)[5] for line in run] == ["cb-test-0", "cb-test-1"]  # every slice, no follow
    remote = shlex.split(run[0])[-1]
    assert "--worker=all" in run[0] and "setsid nohup .venv/bin/python -m contextblip_jax.train" in remote
    assert "--config=configs/imagecode.py --workdir=/mnt/cb-bucket/w" in remote
    assert "> ~/contextblip_logs/train.log" in remote
    follow = dry_run(CASES["run and follow"])[-1]
    assert "--worker=0" in follow and "tail -n 200 -F ~/contextblip_logs/train.log" in follow


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", *WHERE, "--type=v5litepod-16", "--slices=2"], "need a queued resource"),
        (["create", *WHERE, "--type=v9-8"], "no default runtime image"),
        (["run", *WHERE, "--type=v4-8"], "needs the trainer's flags"),
        (["logs", *WHERE, "--type=v4-8", "--slice=1"], "outside 0..0"),
        (["create", *WHERE, "--type=v4-8", "--spot", "--reserved"], "not allowed with"),
    ],
)
def test_impossible_requests_are_refused(args, message):
    result = subprocess.run([TPU, "--dry-run", *args], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_launcher_needs_only_the_standard_library():
    result = subprocess.run([sys.executable, "-I", "-S", os.path.join(ROOT, "launch", "tpu.py"), "--help"],
                            capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "create" in result.stdout
