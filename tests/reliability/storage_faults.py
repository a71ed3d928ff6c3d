"""A `gs://` training run against a Cloud Storage that fails a share of its requests (tests/gcs_server.py: HTTP 503,
dropped connections, slow answers): the run must either finish through the clients' retries with nothing lost, or
stop with an error naming the operation and the object, after which the same command resumes. At the end its
parameters, optimizer state and metrics rows must equal those of an uninterrupted local run.

    python -m tests.reliability.storage_faults --rates=0.01,0.03,0.1 --out=docs/reliability/storage_faults.jsonl
    python -m tests.reliability.storage_faults --rates=0.03 --outage_s=60 --out=docs/reliability/storage_faults.jsonl

`--outage_s=S` adds an outage: once the first run has committed its first checkpoint, every request fails (503)
for S seconds, longer than gcsfs retries (about 30 s), so a write of the workdir's files gives up and the run has
to stop, naming it, and be run again.

One JSON line per fault rate: requests, faults injected (by kind), retries the proxy saw, attempts and the error
line of each attempt that stopped, whether the run completed and matched, wall time, machine and date. The table in
docs/reliability.md is generated from the file (`python -m contextblip_jax.doctables`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import chex

from contextblip_jax import train
from contextblip_jax.compile.hardware import device_name
from tests import gcs_server
from tests.reliability import kills
from tests.runs import ROOT, run_config, train_command

SETTINGS = {"log_every": 1, "checkpoint_every": 2, "eval_every": 4, "eval.splits": ("valid",)}
ATTEMPTS = 5
"""Runs of the same command before giving up: each stop must name what failed, and the next one resumes."""
NAMED = re.compile(r"^error: .*gs://.*$", re.M)
"""An error line that names the object (or folder) it failed on."""


def attempt(
    workdir: str, data_root: str, steps: int, log_path: str, outage: Callable[[], None] | None = None
) -> tuple[int, str]:
    """(exit status, the stopped run's error line or '') of one run of the command; `outage()`, when given, is
    called once the run has committed its first checkpoint, while it goes on."""
    command = train_command(workdir, data_root, *kills.flags(SETTINGS), f"--config.total_steps={steps}")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            if outage is not None:
                while process.poll() is None and not kills.checkpoint_folders(workdir)[0]:
                    time.sleep(0.2)
                outage()
            process.wait(timeout=kills.TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
    with open(log_path) as f:
        output = f.read()
    if process.returncode == 0:
        return 0, ""
    named = NAMED.findall(output)
    if not named:
        raise AssertionError(f"a run stopped (rc {process.returncode}) without naming what failed:\n{output[-3000:]}")
    return process.returncode, named[-1][:400]


def run(rate: float, seed: int, data_root: str, base: str, steps: int, outage_s: float = 0.0) -> dict:
    """One `steps`-step run on a faulty `gs://` at `rate` (and an outage of `outage_s` in the first run), rerun
    until done; the report (AssertionError on any difference from an uninterrupted local run)."""
    began = time.monotonic()
    faults = gcs_server.Faults(rate=rate, kinds=gcs_server.RANDOM_KINDS, slow_s=2.0, seed=seed)
    stops: list[str] = []
    with gcs_server.serve(bucket=f"faults-{seed}", faults=None) as server:
        os.environ.update(server.env)
        workdir = server.url("run")
        server.set_faults(faults)

        def outage() -> None:
            server.set_faults(gcs_server.Faults(rate=1.0, kinds=("503",)))
            time.sleep(outage_s)
            server.set_faults(faults)

        for number in range(1, ATTEMPTS + 1):
            log_path = os.path.join(base, f"attempt-{number}.log")
            status, error = attempt(workdir, data_root, steps, log_path, outage if outage_s and number == 1 else None)
            if status == 0:
                break
            stops.append(error)
        else:
            raise AssertionError(f"not done after {ATTEMPTS} attempts: {stops}")
        server.set_faults(None)
        counts = server.counts()
        straight = os.path.join(base, "straight")
        overrides = {key.replace(".", "__"): value for key, value in SETTINGS.items()}
        train.train(run_config(data_root, total_steps=steps, **overrides), straight)
        chex.assert_trees_all_equal(kills.final_state(workdir, steps), kills.final_state(straight, steps))
        rows = kills.comparable_rows(workdir)
        assert rows == kills.comparable_rows(straight), "metrics rows differ from the uninterrupted run's"
    return {
        "rate": rate,
        "outage_s": outage_s,
        "kinds": list(faults.kinds),
        "slow_s": faults.slow_s,
        "seed": seed,
        "steps": steps,
        **{key: counts[key] for key in ("requests", "faults", "503", "drop", "slow", "retries")},
        "attempts": len(stops) + 1,
        "stops": stops,
        "completed": True,
        "equal_to_local": True,
        "rows_compared": len(rows),
        "wall_s": round(time.monotonic() - began, 1),
        "machine": device_name(),
        "date": datetime.date.today().isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.01,0.03", help="comma-separated shares of requests given a fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--data_root", default=None, help="generated data (default: generated in a temporary folder)")
    parser.add_argument("--outage_s", type=float, default=0.0, help="seconds of failing requests, 1st run")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    base = tempfile.mkdtemp(prefix="storage-faults-")
    data_root = args.data_root
    if data_root is None:
        from contextblip_jax.training import inputs

        data_root = os.path.join(base, "data")
        inputs.ensure_synthetic_data(run_config(data_root))
    for rate in map(float, args.rates.split(",")):
        folder = tempfile.mkdtemp(prefix=f"rate-{rate}-", dir=base)
        line = json.dumps(run(rate, args.seed, data_root, folder, args.steps, args.outage_s))
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
