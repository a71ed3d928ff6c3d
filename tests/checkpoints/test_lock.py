"""The workdir lock (`W/lock.json`): one run writes a workdir; a second is refused, a dead one's lock taken over."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from contextblip_jax.checkpoints import lock as lock_module
from contextblip_jax.checkpoints.lock import WorkdirLock, WorkdirLocked, WorkdirLockLost, holder, kvstore_spec

open_kvstore = lock_module._open

HOST, PID = socket.gethostname(), os.getpid()
_HOLD = """
import sys, time
from contextblip_jax.checkpoints.lock import WorkdirLock, WorkdirLocked
lock = WorkdirLock(sys.argv[1], stale_after_s=60, heartbeat_s=0.2)
while time.time() < float(sys.argv[2]):  # the racers start together
    pass
try:
    lock.acquire()
except WorkdirLocked:
    print("locked", flush=True)
else:
    print("won", flush=True)
    sys.stdin.read()
    lock.release()
"""
"""A process that takes the lock at time argv[2], says whether it won, and holds it until its stdin is closed."""


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    """The tests decide which SLURM job they are part of, whatever job runs the suite."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


def _start(workdir: str, at: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLD, workdir, str(at)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture()
def holding(tmp_path) -> Iterator[subprocess.Popen]:
    """Another process holding `tmp_path`'s lock (heartbeat every 0.2 s)."""
    process = _start(str(tmp_path))
    try:
        assert process.stdout.readline() == "won\n"
        yield process
    finally:
        process.kill()
        process.wait()


def _write_record(workdir, **fields) -> None:
    """A lock record as another run on another host would have left it."""
    now = time.time()
    record = {"host": "elsewhere", "pid": 4242, "started": now, "started_iso": "then", "heartbeat": now, "token": "t"}
    (workdir / "lock.json").write_text(json.dumps(record | fields))


def _eventually(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.time() + within_s
    while not condition():
        assert time.time() < deadline, "the condition did not come true in time"
        time.sleep(0.02)


def test_a_lock_on_an_empty_workdir_records_its_holder_and_release_removes_it(tmp_path):
    with WorkdirLock(str(tmp_path), stale_after_s=5, heartbeat_s=1) as lock:
        record = holder(str(tmp_path))
        assert (record["host"], record["pid"], record["argv"]) == (HOST, PID, sys.argv)
        assert abs(record["heartbeat"] - time.time()) < 5 and record["started_iso"]
        lock.check()
    assert holder(str(tmp_path)) is None and not (tmp_path / "lock.json").exists()
    lock.release()  # again: nothing to do


def test_a_second_lock_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    message = re.escape(f"{tmp_path} is in use by another run: {HOST} pid {PID} (started ")
    with WorkdirLock(str(tmp_path), stale_after_s=5, heartbeat_s=1), pytest.raises(WorkdirLocked, match=message):
        WorkdirLock(str(tmp_path)).acquire()
    assert issubclass(WorkdirLocked, RuntimeError)


def test_a_lock_held_by_another_live_process_is_refused(tmp_path, holding):
    with pytest.raises(WorkdirLocked, match=rf"{HOST} pid {holding.pid} \(started .*stale after 60 s") as refused:
        WorkdirLock(str(tmp_path), stale_after_s=60, heartbeat_s=1).acquire()
    assert "Stop the other run, or wait" in str(refused.value)


def test_the_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path, holding, caplog):
    os.kill(holding.pid, signal.SIGKILL)
    holding.wait()  # reaped: no zombie left under its pid
    with WorkdirLock(str(tmp_path), stale_after_s=60, heartbeat_s=1):
        assert holder(str(tmp_path))["pid"] == PID
    assert f"took over the lock from {HOST} pid {holding.pid} (started " in caplog.text
    assert f"its process {holding.pid} no longer exists" in caplog.text


def test_a_lock_whose_heartbeat_stopped_is_taken_over_and_a_fresh_one_from_another_host_is_refused(tmp_path):
    _write_record(tmp_path, heartbeat=time.time() - 30)
    with WorkdirLock(str(tmp_path), stale_after_s=10, heartbeat_s=1):
        assert holder(str(tmp_path))["host"] == HOST
    _write_record(tmp_path)
    with pytest.raises(WorkdirLocked, match=r"elsewhere pid 4242 \(started then\), its last heartbeat 0 s ago"):
        WorkdirLock(str(tmp_path), stale_after_s=10, heartbeat_s=1).acquire()
    assert holder(str(tmp_path))["host"] == "elsewhere"


def test_a_lock_record_that_is_not_one_is_taken_over(tmp_path):
    (tmp_path / "lock.json").write_text("{not json")
    with WorkdirLock(str(tmp_path), stale_after_s=10, heartbeat_s=1):
        assert holder(str(tmp_path))["pid"] == PID


@pytest.mark.parametrize(("job", "restart", "taken"), [("7", "1", True), ("7", "0", False), ("8", "1", False)])
def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_only(tmp_path, monkeypatch, job, restart, taken):
    _write_record(tmp_path, slurm_job_id="7", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    lock = WorkdirLock(str(tmp_path), stale_after_s=10, heartbeat_s=1)
    if not taken:
        with pytest.raises(WorkdirLocked, match="elsewhere pid 4242"):
            lock.acquire()
        return
    with lock:
        assert holder(str(tmp_path))["slurm_job_id"] == "7"
        assert (holder(str(tmp_path))["pid"], holder(str(tmp_path))["slurm_restart_count"]) == (PID, 1)


def test_the_heartbeat_advances_and_a_holder_taken_over_stops_and_leaves_the_new_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    first = WorkdirLock(str(tmp_path), stale_after_s=5, heartbeat_s=0.05).acquire()
    beat = holder(str(tmp_path))["heartbeat"]
    _eventually(lambda: holder(str(tmp_path))["heartbeat"] > beat)

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued the job: its next run takes the lock over
    second = WorkdirLock(str(tmp_path), stale_after_s=5, heartbeat_s=0.05).acquire()
    time.sleep(0.3)  # several of the first's heartbeats, none of which may overwrite the new holder
    assert holder(str(tmp_path))["slurm_restart_count"] == 1
    with pytest.raises(WorkdirLockLost, match=rf"taken over by {HOST} pid {PID} \(started "):
        first.check()
    first.release()
    assert holder(str(tmp_path))["slurm_restart_count"] == 1
    beat = holder(str(tmp_path))["heartbeat"]
    _eventually(lambda: holder(str(tmp_path))["heartbeat"] > beat)  # the new holder's heartbeat goes on
    second.check()
    second.release()
    assert holder(str(tmp_path)) is None


class _Flaky:
    """A kvstore whose next `failures` writes raise as an unreachable storage would: before the write, or after it
    landed (`landed`: its answer lost on the way back)."""

    def __init__(self, kv):
        self.kv, self.failures, self.landed = kv, 0, False

    def read(self, key):
        return self.kv.read(key)

    def write(self, key, value, if_equal):
        if not self.failures:
            return self.kv.write(key, value, if_equal=if_equal)
        self.failures -= 1
        if self.landed:
            self.kv.write(key, value, if_equal=if_equal).result()
        raise ValueError("UNAVAILABLE: injected")


@pytest.mark.parametrize(("failures", "landed"), [(3, False), (1, True)])
def test_heartbeats_that_fail_to_be_written_are_tried_again(tmp_path, monkeypatch, caplog, failures, landed):
    flaky = []

    def opened(workdir: str) -> _Flaky:
        flaky.append(_Flaky(open_kvstore(workdir)))
        return flaky[-1]

    monkeypatch.setattr(lock_module, "_open", opened)
    lock = WorkdirLock(str(tmp_path), stale_after_s=5, heartbeat_s=0.05).acquire()
    flaky[0].failures, flaky[0].landed = failures, landed
    _eventually(lambda: not flaky[0].failures)
    beat = holder(str(tmp_path))["heartbeat"]
    _eventually(lambda: holder(str(tmp_path))["heartbeat"] > beat)
    lock.check()
    lock.release()
    assert holder(str(tmp_path)) is None
    assert "could not write the lock's heartbeat: UNAVAILABLE: injected" in caplog.text


def test_of_threads_racing_for_a_lock_exactly_one_wins(tmp_path):
    locks = [WorkdirLock(str(tmp_path), stale_after_s=5, heartbeat_s=1) for _ in range(8)]
    start, won, refused = threading.Barrier(len(locks)), [], []

    def race(lock: WorkdirLock) -> None:
        start.wait()
        try:
            won.append(lock.acquire())
        except WorkdirLocked:
            refused.append(lock)

    threads = [threading.Thread(target=race, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(refused)) == (1, len(locks) - 1)
    won[0].release()


def test_of_processes_racing_for_a_lock_exactly_one_wins(tmp_path):
    at = time.time() + 1.5  # after every process has imported tensorstore
    racers = [_start(str(tmp_path), at=at) for _ in range(4)]
    said = [process.stdout.readline().strip() for process in racers]  # the winner holds on until all have said
    assert sorted(said) == ["locked", "locked", "locked", "won"]
    for process in racers:
        process.communicate(timeout=30)
    assert holder(str(tmp_path)) is None


def test_a_cloud_storage_workdir_is_a_gcs_kvstore_and_other_urls_are_refused():
    assert kvstore_spec("gs://bucket/some/path") == {"driver": "gcs", "bucket": "bucket", "path": "some/path/"}
    assert kvstore_spec("gs://bucket/some/path/") == kvstore_spec("gs://bucket/some/path")
    assert kvstore_spec("gs://bucket") == {"driver": "gcs", "bucket": "bucket", "path": ""}
    assert kvstore_spec("runs/a") == {"driver": "file", "path": os.path.abspath("runs/a") + "/"}
    with pytest.raises(ValueError, match="s3://bucket/run"):
        kvstore_spec("s3://bucket/run")
    with pytest.raises(ValueError, match="gs:///run"):
        kvstore_spec("gs:///run")


def _gated(write, gate: threading.Barrier):
    """`write` that waits at `gate` the first time it is called."""
    first = [True]

    def gated(*args, **kwargs):
        if first[0]:
            first[0] = False
            gate.wait(timeout=60)
        return write(*args, **kwargs)

    return gated


def test_on_cloud_storage_a_held_lock_is_refused_and_of_racers_exactly_one_wins(gcs):
    """Through Cloud Storage's preconditions (`ifGenerationMatch`, which the test proxy enforces as Google does)."""
    workdir = gcs.url("run")
    first = WorkdirLock(workdir, stale_after_s=5, heartbeat_s=1).acquire()
    with pytest.raises(WorkdirLocked, match=rf"{re.escape(workdir)} is in use by another run: {HOST} pid {PID}"):
        WorkdirLock(workdir, stale_after_s=5, heartbeat_s=1).acquire()
    first.release()
    assert holder(workdir) is None

    racers = [WorkdirLock(gcs.url("raced"), stale_after_s=5, heartbeat_s=1) for _ in range(6)]
    start, won = threading.Barrier(len(racers)), []
    # every racer reads the lock as absent before any writes it, so that the preconditions, not the reads, decide
    # (without the gate a fast first writer lets the others find its lock and never try: no precondition fails)
    gate = threading.Barrier(len(racers))
    for lock in racers:
        lock._write = _gated(lock._write, gate)  # type: ignore[method-assign]

    def race(lock: WorkdirLock) -> None:
        start.wait()
        with contextlib.suppress(WorkdirLocked):
            won.append(lock.acquire())

    threads = [threading.Thread(target=race, args=(lock,)) for lock in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and gcs.counts()["precondition_failed"] == len(racers) - 1
    won[0].release()
