"""Shared pytest setup: tests import helpers as `tests.<module>`; slow tests are opt-in (`-m slow`); the trainer
tests' generated data and their 8-device reference runs.

The suite runs on two pytest-xdist workers (`-n 2` in pyproject.toml): most tests spend their time in XLA's
compiler, which uses one core. Tests that share the costly `eight_devices` runs, and the SLURM tests (one local
cluster), are kept on one worker (`xdist_group`), so that each is built once.

On a machine without a GPU or TPU, JAX_PLATFORMS=cpu is set for the session and its subprocesses.

XLA's persistent compilation cache lives in a fresh folder per session and is inherited by the subprocesses the
trainer tests start: many tests compile the same tiny programs (parameter initialisers, the same train step), and
compiling dominates their time on a CPU. For the same reason the suite compiles with LLVM's optimisations off
(`--xla_backend_optimization_level=0`; 12% less time for the train-step tests, whose programs run for
milliseconds); the main job's test (`test_main_job.py`), which trains for real, starts its runs without it.

Two passes: the default one (`python -m pytest -q`) and `-m long`, the end-to-end checks that start processes,
clusters or whole training runs; CI runs both. `-m slow` holds the full-size checks, run by hand.
"""

import glob
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="contextblip-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if not os.path.exists("/proc/driver/nvidia") and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*"):
    # No GPU or TPU here: the CPU is what jax would pick anyway, and naming it keeps the deviceless-compilation
    # wheels (the `accelerators` extra) from trying to start a CUDA or TPU backend (a traceback per process).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests import gcs_server
from tests.runs import ROOT, SUITE_XLA_FLAG, device_env, run_config

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{SUITE_XLA_FLAG} {os.environ.get('XLA_FLAGS', '')}".strip()

SHARED_FIXTURE_GROUPS = {"eight_devices": "eight_devices", "cluster": "eight_devices", "trained": "trained",
                         "facts": "parallel_facts"}  # fmt: skip
"""Costly fixtures (fixture -> xdist group): every test that uses one runs on the same worker, which builds it
once. Without a group, xdist spreads a module's tests over both workers and each builds the fixture again."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group marks into worker assignments
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        groups = {group for name, group in SHARED_FIXTURE_GROUPS.items() if name in names}
        if groups:
            item.add_marker(pytest.mark.xdist_group(min(groups)))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    """The generated folder the trainer tests' configs ask for (`run_config`: 12 training sets), written as the
    trainer itself writes it (`synthetic.ensure`, behind its manifest, plus stage 1's captions), so that runs
    find it ready and never regenerate it under one another."""
    from contextblip_jax.training import inputs

    root = str(tmp_path_factory.mktemp("synthetic"))
    inputs.ensure_synthetic_data(run_config(root))
    return root


@pytest.fixture(scope="session")
def eight_devices(tmp_path_factory, data_root) -> dict[str, str]:
    """One process with 8 simulated CPU devices trains the tiny model on meshes (8,1,1) for 3 steps, (2,4,1) and
    (2,2,2) for 1 step each, checkpointing every step and evaluating nothing; {mesh: workdir}. The reference of
    the sharding, multi-process and SLURM tests, which compare train losses and parameters."""
    base = tmp_path_factory.mktemp("eight")
    meshes = {"(8,1,1)": 3, "(2,4,1)": 1, "(2,2,2)": 1}
    workdirs = {mesh: str(base / mesh.strip("()").replace(",", "")) for mesh in meshes}
    script = "from contextblip_jax import train\nfrom tests.runs import run_config\n" + "".join(
        f"train.train(run_config({data_root!r}, total_steps={steps}, log_every=1, checkpoint_every=1, "
        f"keep_checkpoints=3, mesh={mesh}, eval__splits=()), {workdirs[mesh]!r})\n"
        for mesh, steps in meshes.items()
    )
    env = device_env(8)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdirs


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[gcs_server.GcsServer]:
    """A local Cloud Storage for this test alone (tests/gcs_server.py): gcp-storage-emulator behind a proxy that
    enforces preconditions and injects faults when asked (`gcs.set_faults`). Its environment is set for this
    process, so that `gs://` in tensorstore, gcsfs and etils.epath reaches it; `gcs.env` is for subprocesses.

    Starting one takes a fifth of a second, so each test gets its own, and a bucket named afresh
    (`gcs.bucket`, `gcs.url(path)`): caches keyed by bucket (tensorstore's open kvstores, gcsfs's listings) cannot
    carry another test's objects or endpoint over. gcsfs's cached filesystems are dropped too; they read the
    endpoint from the environment on every call, but keep the listings they made."""
    if not gcs_server.installed():
        pytest.skip("no local Cloud Storage: gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    with gcs_server.serve(bucket=f"test-{secrets.token_hex(4)}") as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        if "gcsfs" in sys.modules:
            sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
        yield server
