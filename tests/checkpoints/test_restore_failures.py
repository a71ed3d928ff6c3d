"""Restoring a run told apart from damage: a storage failure while reading a checkpoint is retried and, if it
lasts, stops the run naming the checkpoint, without setting it aside or rewinding to an older one; with two
processes, both always restore the same step (tests/checkpoints/two_processes.py)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from contextblip_jax.checkpoints import run_state
from contextblip_jax.checkpoints.run_state import RunCheckpoints
from contextblip_jax.storage import CheckpointReadError, is_storage_failure
from tests.checkpoints.test_run_state import DAMAGE, abstract, iterator, state, two_checkpoints
from tests.runs import ROOT, device_env


def outage(error: BaseException, failing_reads: int):
    """A `RunCheckpoints.restore` whose first `failing_reads` reads of step 2 raise `error`, as a storage outage
    would; the reads counted in the returned list."""
    real = RunCheckpoints.restore
    reads: list[int] = []

    def restore(self, step, abstract_state, data):
        reads.append(step)
        if step == 2 and reads.count(2) <= failing_reads:
            raise error
        return real(self, step, abstract_state, data)

    return restore, reads


UNAVAILABLE = ValueError('UNAVAILABLE: Error reading "d/0" from gs://bucket/run: HTTP response code: 503')
"""How tensorstore reports a Cloud Storage 503 once its own retries are spent."""


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(run_state, "READ_RETRY_DELAYS_S", (0.01, 0.01, 0.01))


def test_a_storage_failure_that_passes_is_retried_and_the_newest_checkpoint_restored(tmp_path, monkeypatch, caplog):
    two_checkpoints(tmp_path)
    restore, reads = outage(UNAVAILABLE, failing_reads=2)
    monkeypatch.setattr(RunCheckpoints, "restore", restore)
    step, restored, _ = RunCheckpoints(str(tmp_path)).restore_latest(abstract(), iterator())
    assert step == 2 and reads == [2, 2, 2]
    jax.tree.map(np.testing.assert_array_equal, restored, state(2.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert sum("storage failure" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(
    "error",
    [UNAVAILABLE, ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), TimeoutError("read timed out")],
    ids=["tensorstore 503", "connection reset", "timeout"],
)
def test_a_lasting_storage_failure_stops_the_run_naming_the_checkpoint_and_moves_nothing(tmp_path, monkeypatch, error):
    two_checkpoints(tmp_path)
    restore, reads = outage(error, failing_reads=100)
    monkeypatch.setattr(RunCheckpoints, "restore", restore)
    with pytest.raises(CheckpointReadError, match=r"checkpoint 2 in .*checkpoints could not be read.*4 tries.*again"):
        RunCheckpoints(str(tmp_path)).restore_latest(abstract(), iterator())
    assert reads == [2, 2, 2, 2]  # never fell back to step 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_what_damage_raises_is_not_taken_for_a_storage_failure(tmp_path, damage):
    two_checkpoints(tmp_path)
    DAMAGE[damage](tmp_path / "checkpoints" / "2")
    checkpoints = RunCheckpoints(str(tmp_path))
    with pytest.raises(Exception) as raised:
        checkpoints.restore(2, abstract(), iterator())
    assert not is_storage_failure(raised.value), repr(raised.value)


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


class HttpError(Exception):
    """The shape of gcsfs's HTTP errors: a `code`."""

    def __init__(self, code: int):
        super().__init__(f"HTTP {code}")
        self.code = code


@pytest.mark.parametrize(
    ("error", "storage"),
    [
        (ValueError("DEADLINE_EXCEEDED: reading gs://b/x"), True),
        (ValueError("PERMISSION_DENIED: HTTP response code: 403"), True),
        (chained(RuntimeError("restore failed"), HttpError(503)), True),
        (chained(RuntimeError("restore failed"), HttpError(429)), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (PermissionError("no access"), True),
        (FileNotFoundError("_METADATA"), False),
        (json.JSONDecodeError("Expecting value", "{", 0), False),
        (ValueError("DATA_LOSS: Error reading chunk"), False),
        (ValueError("NOT_FOUND: d/0"), False),
        (chained(RuntimeError("restore failed"), HttpError(404)), False),
        (ValueError("a message that mentions UNAVAILABLE later on"), False),
    ],
)
def test_storage_failures_are_recognised_through_the_chain_of_causes(error, storage):
    assert is_storage_failure(error) is storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: str, unreadable: str) -> list[dict]:
    """Both processes of a 2-process run (2 CPU devices each) write steps 1 and 2 to `workdir`, then restore it;
    process 1 cannot read step 2 in the way `unreadable` says. Each one's JSON line of what it restored."""
    port = free_port()
    env = device_env(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    command = [sys.executable, "-m", "tests.checkpoints.two_processes", workdir, f"localhost:{port}", unreadable]
    started = [
        subprocess.Popen([*command, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=240) for process in started]
    finally:
        for process in started:
            process.kill()
    for process, (_, err) in zip(started, outputs, strict=True):
        assert process.returncode == 0, err.decode()[-3000:]
    return [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.long
def test_two_processes_restore_the_same_step_when_only_one_can_read_the_newest(tmp_path):
    damaged = run_two_processes(str(tmp_path), "damaged")
    assert [r["restored"] for r in damaged] == [1, 1]  # process 0 could read step 2, yet follows process 1
    aside = [name for name in os.listdir(tmp_path / "checkpoints") if name.startswith("damaged-2-")]
    assert len(aside) == 1
    assert damaged[0]["values"] == damaged[1]["values"] == state(1.0).trainable["head.proj.kernel"].tolist()
    failed = run_two_processes(str(tmp_path / "again"), "storage")
    assert [r["error"].split(":")[0] for r in failed] == ["CheckpointReadError"] * 2
    assert all("checkpoint 2" in r["error"] and "on process 1" in r["error"] for r in failed)
    assert sorted(os.listdir(tmp_path / "again" / "checkpoints")) == ["1", "2"]
