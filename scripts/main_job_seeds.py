"""Runs the README's main job once per seed and appends one JSON line per run to docs/main_job/seeds.jsonl: the
validation accuracy at each evaluation, the video / static split at the end, the wall time, the lines the run
printed (stdout and stderr, kept as W/console.log), the machine and the date. The README's headline table is
generated from that file (`python -m contextblip_jax.doctables`).

    python scripts/main_job_seeds.py --seeds=0,1,2

Every seed trains from its own fresh workdir on the same generated data (the main job's defaults), one run at a
time, with nothing else asked of the machine by this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "main_job", "seeds.jsonl")


def machine() -> str:
    """The processor's model name and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def run_seed(seed: int, workdirs: str) -> dict:
    workdir = os.path.join(workdirs, f"seed{seed}")
    shutil.rmtree(workdir, ignore_errors=True)  # a run left there would resume instead of training
    command = [
        sys.executable, "-m", "contextblip_jax.train", "--config=configs/synthetic.py", f"--workdir={workdir}",
        f"--config.seed={seed}",
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - began
    console = done.stdout + done.stderr
    with open(os.path.join(workdir, "console.log"), "w") as f:
        f.write(console)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        valid = [row for row in map(json.loads, f) if row["split"] == "valid"]
    return {
        "seed": seed,
        "acc": {str(row["step"]): row["acc"] for row in valid},
        "acc_video": valid[-1]["acc_video"],
        "acc_static": valid[-1]["acc_static"],
        "wall_s": round(wall, 1),
        "console_lines": len(console.splitlines()),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *command[1:4], "--workdir=W", "--config.seed=N"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds, each a run of its own.")
    parser.add_argument("--workdirs", default=os.path.join(ROOT, "workdirs", "seeds"), help="Where the runs go.")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        row = run_seed(seed, args.workdirs)
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
