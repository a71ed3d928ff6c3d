"""The commands talk to a person: a user's mistake ends in one `error:` line and exit status 2, never a traceback,
and a run's console holds the project's own lines (start-up, progress, evaluations, summary) and warnings, not
the libraries' INFO logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.runs import FAST, ROOT, SETS

pytestmark = pytest.mark.long  # each test starts the trainer as a user would: CI's end-to-end pass

PACKAGE_FILES = {name for _, _, files in os.walk(os.path.join(ROOT, "contextblip_jax")) for name in files}
_ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ ([^:\s]+):\d+\]")
"""A Python INFO line as absl writes it (the CUDA plugin's C++ start-up lines, where it is installed, have another
clock and are not Python logging's to silence)."""


def tiny_train(workdir: str, data_root: str, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "contextblip_jax.train", "--config=configs/synthetic.py:variant=tiny",
        f"--workdir={workdir}", f"--config.data.root={data_root}", f"--config.data.synthetic={SETS}",
        *(f"--config.{key}={value}" for key, value in FAST.items()), *flags,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def assert_one_error_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


def test_a_folder_the_generator_did_not_write_is_one_error_line(tmp_path):
    foreign = tmp_path / "imagecode"
    foreign.mkdir()
    (foreign / "train_data.json").write_text(json.dumps({"set-a": {"0": "a red square"}}))
    result = tiny_train(str(tmp_path / "w"), str(foreign))
    assert_one_error_line(result, "holds ImageCoDe data without a")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--config.remat_policy=everything", "remat_policy 'everything' unknown"),
        ("--config.best.metric=loss", "best.metric 'loss' is not in the evaluation rows"),
        ("--config.init=/nowhere/weights", "init /nowhere/weights does not exist"),
    ],
)
def test_a_bad_config_value_is_one_error_line_before_anything_is_built(tmp_path, data_root, flag, message):
    result = tiny_train(str(tmp_path / "w"), data_root, flag)
    assert_one_error_line(result, message)
    assert not (tmp_path / "w").exists()


def test_a_runs_console_is_short_and_holds_no_library_info_lines(tmp_path, data_root):
    """30 steps, an evaluation every 10 and a checkpoint every 5: Orbax alone logs dozens of INFO lines per
    checkpoint, none of which may reach the console; `--verbosity=1` brings them back."""
    flags = ("--config.total_steps=30", "--config.eval_every=10", "--config.checkpoint_every=5")
    result = tiny_train(str(tmp_path / "w"), data_root, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    foreign = [line for line in lines if (m := _ABSL_INFO.match(line)) and m.group(1) not in PACKAGE_FILES]
    assert foreign == [] and len(lines) <= 60, "\n".join(lines)
    assert sum("valid: acc" in line for line in lines) == 3
    assert result.stdout.splitlines()[-2].startswith("done: best valid acc")
    verbose = tiny_train(str(tmp_path / "v"), data_root, *flags, "--verbosity=1")
    assert any("checkpoint_manager.py" in line for line in verbose.stderr.splitlines())
