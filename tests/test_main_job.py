"""The README's main job learns: two seeds of the CPU recipe (configs/synthetic.py), stopped at 400 of its 600
steps, both well above chance (0.1). The bar sits below every seed's accuracy at step 400 in the README's table
(docs/main_job/seeds.jsonl), with margin for other processors' rounding. CI's long pass; a few minutes per seed on
2 cores (`python -m pytest -q -m long -s tests/test_main_job.py`)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from contextblip_jax.training.telemetry import read_metrics
from tests.runs import ROOT, user_env

STEPS = 400
BAR = 0.5
"""Five times chance; the five seeds of docs/main_job/seeds.jsonl reach 0.71-0.84 at step 400 (Intel Xeon, 2 cores)."""


@pytest.mark.long
@pytest.mark.parametrize("seed", [0, 1])
def test_main_job_learns_well_above_chance(tmp_path_factory, seed):
    data = str(tmp_path_factory.getbasetemp() / "synthetic_data")  # generated once, reused by the second seed
    workdir = tmp_path_factory.mktemp(f"seed{seed}")
    command = [
        sys.executable, "-m", "contextblip_jax.train", "--config=configs/synthetic.py", f"--workdir={workdir}",
        f"--config.data.root={data}", f"--config.seed={seed}", f"--config.total_steps={STEPS}",
        "--config.eval_every=0", "--config.checkpoint_every=100000",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=1800, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = [row for row in read_metrics(str(workdir)) if row["split"] == "valid"][-1]
    print(f"seed {seed}: {final} in {time.perf_counter() - start:.0f} s")
    assert final["step"] == STEPS and final["acc"] >= BAR, final
