"""One run per workdir, through the command: a second run started on a workdir another run is writing exits with
status 2 within seconds, naming the first, and the first trains on as if alone; on local disk and on `gs://`."""

from __future__ import annotations

import subprocess
import time

import pytest

from contextblip_jax import train
from contextblip_jax.checkpoints.lock import holder
from tests.reliability import kills
from tests.runs import ROOT, run_config, train_command

STEPS = 16
"""Long enough that the first run still trains while the second one starts and is refused."""
REFUSED_WITHIN_S = 60
"""From the second run's start to its exit: imports and jax start-up (about 10 s on a loaded 2-core machine), then
one read of the lock; it never compiles or touches the workdir's files."""
FLAGS = (f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.checkpoint_every=4")


@pytest.fixture(scope="module")
def solo_rows(tmp_path_factory, data_root) -> list[str]:
    workdir = str(tmp_path_factory.mktemp("solo"))
    train.train(run_config(data_root, total_steps=STEPS, log_every=1, checkpoint_every=4), workdir)
    return kills.comparable_rows(workdir)


@pytest.mark.long
@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_second_run_on_a_workdir_exits_2_naming_the_first_which_trains_on_as_if_alone(
    where, request, tmp_path, data_root, solo_rows
):
    workdir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("gcs").url("run")
    command = train_command(workdir, data_root, *FLAGS)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while holder(workdir) is None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        began = time.monotonic()
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=REFUSED_WITHIN_S)
        took = time.monotonic() - began
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"error: workdir {workdir} is in use by another run" in second.stderr
    assert f"pid {first.pid} " in second.stderr, second.stderr[-2000:]
    assert took < REFUSED_WITHIN_S
    assert kills.comparable_rows(workdir) == solo_rows
    assert holder(workdir) is None  # released at the end
