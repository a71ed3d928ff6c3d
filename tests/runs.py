"""Run configs for trainer tests: the main job's config at the `tiny` variant on a small generated folder.

Tests build configs in-process (`run_config`) and, where a separate process is the point (resume, SIGTERM,
several processes, 8 simulated devices, the command lines), the equivalent command line (`train_command`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import ml_collections

from contextblip_jax.runconfig import config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = 12
SUITE_XLA_FLAG = "--xla_backend_optimization_level=0"
"""The suite's compile setting (conftest.py): tiny programs compile faster without LLVM's optimisations."""
FAST = {"data.batch_size": 8, "eval.batch_size": 8, "eval_every": 0}
"""Small batches, and evaluation only at the end (or when a test asks)."""


def device_env(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment for a child JAX process with `devices` simulated CPU devices: XLA_FLAGS are
    extended (the suite's compile settings stay), not replaced."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


def facts_on_devices(module: str, devices: int, *args: str, timeout: int = 600) -> dict:
    """Runs test module `module` as a script (`python -m module args`) with `devices` simulated CPU devices, which
    the pytest process (one device) cannot have, and returns the JSON object its last output line holds."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=device_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def user_env() -> dict[str, str]:
    """This process's environment without the suite's compile settings (conftest.py): for a child process that
    must compile and run as a user's would."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f != SUITE_XLA_FLAG)
    return {**os.environ, "XLA_FLAGS": flags}


def run_config(data_root: str, stage: str = "finetune", **overrides: Any) -> ml_collections.ConfigDict:
    """The main job's config for `stage` at the tiny variant; `overrides` use dotted keys with `__` for dots
    (`optimizer__lr=1.0`)."""
    config = config_file("synthetic", f"stage={stage},variant=tiny")
    values = {"data.root": data_root, "data.synthetic": SETS, **FAST}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    config.update_from_flattened_dict(values)
    return config


def train_command(workdir: str, data_root: str, *flags: str, stage: str = "finetune") -> list[str]:
    """The command line of `run_config(data_root, stage)` plus `flags` (`--config.total_steps=3`)."""
    fast = [f"--config.{key}={value}" for key, value in FAST.items()]
    return [
        sys.executable, "-m", "contextblip_jax.train", f"--config=configs/synthetic.py:stage={stage},variant=tiny",
        f"--workdir={workdir}", f"--config.data.root={data_root}", f"--config.data.synthetic={SETS}", *fast, *flags,
    ]  # fmt: skip
