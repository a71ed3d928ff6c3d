"""The paper's ablations in miniature, one command: every cell of the grid trained with the trainer's own commands
at the main job's model size, on one generated mix of today's scene kinds and the two built to need the method's
parts (`recolour`: video, resolved only by comparing frames; `detail`: static, a mark a few pixels wide), per seed.

    python scripts/ablations.py --seeds=0,1,2
    python scripts/ablations.py --seeds=0,1,2 --follow_up   # then the follow-up cells (FOLLOW_UP_RUNS)

| cell           | runs (each from the one before, `--config.init`)   | tests                                  |
|----------------|----------------------------------------------------|----------------------------------------|
| 2a             | 2a from scratch                                    | the reference                          |
| 2a, no adapter | 2a with `model.adapter.enabled=False`              | the adapter (against 2a)               |
| 1 → 2a         | stage 1 (ITM + TMIM), then 2a                      | stage 1 (against 2a)                   |
| 1 no TMIM → 2a | stage 1 with `loss.tmim=0`, then 2a                | TMIM (against 1 → 2a)                  |
| 2a → 2b        | 2a, then the inter-context encoder                 | 2b (against 2a)                        |
| 1 → 2a → 2b    | the paper's whole recipe                           | 2b after the whole recipe (vs 1 → 2a)  |

Every run of a seed shares that seed; every cell uses the same recipe (configs/synthetic.py's rates and schedule,
`--steps` per stage), nothing tuned per cell. Each cell is scored once, at its last step, on the validation split
(`evaluate --checkpoint=latest`: no checkpoint is chosen on the split it is scored on), overall, video, static and
per scene kind. Appends one JSON line per run to docs/ablations/runs.jsonl (its wall time) and to
docs/ablations/losses.jsonl (`training_losses`), one per (cell, seed) to docs/ablations/cells.jsonl, and writes
docs/ablations/partial_knowledge.json (`partial_knowledge`); docs/ablations.md's tables are generated from them
(`python -m contextblip_jax.doctables`). A run whose workdir already finished is not trained again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time

from main_job_seeds import ROOT, machine

OUT = os.path.join(ROOT, "docs", "ablations")
KINDS = "attributes:0.2,motion:0.2,recolour:0.3,detail:0.3"

RUNS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "1": ("pretrain", None, ()),
    "1-notmim": ("pretrain", None, ("--config.loss.tmim=0",)),
    "2a": ("finetune", None, ()),
    "2a-noadapter": ("finetune", None, ("--config.model.adapter.enabled=False",)),
    "1-2a": ("finetune", "1", ()),
    "1notmim-2a": ("finetune", "1-notmim", ()),
    "2a-2b": ("context", "2a", ()),
    "1-2a-2b": ("context", "1-2a", ()),
}
"""Each training run: its stage, the run it starts from, its own flags."""

CELLS = {
    "2a": "2a",
    "2a, no adapter": "2a-noadapter",
    "1 → 2a": "1-2a",
    "1 no TMIM → 2a": "1notmim-2a",
    "2a → 2b": "2a-2b",
    "1 → 2a → 2b": "1-2a-2b",
}
"""Each cell of the table and the run it scores."""

FOLLOW_UP_RUNS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "2a-2b-long": ("context", "2a", ()),
}
"""`--follow_up`: stage 2b for `--steps_2b_long` steps instead of `--steps_2b`, from the grid's 2a runs. The
inter-context encoder's output `encoder(x + pos) + x` starts far larger than the unit vectors x it is added to,
so at first it scrambles 2a's ranking; the grid's 2b may spend its steps winning that ranking back."""
FOLLOW_UP_CELLS = {"2a → 2b, 4× the steps (follow-up)": "2a-2b-long"}


def common_flags(seed: int, steps: int, args: argparse.Namespace) -> list[str]:
    """What every run and every scoring of one seed shares: the seed, the schedule's length, the data."""
    return [
        f"--config.seed={seed}",
        f"--config.total_steps={steps}",
        f"--config.eval_every={steps}",
        f"--config.checkpoint_every={steps}",
        f"--config.data.root={os.path.join(args.workdirs, 'data')}",
        f"--config.data.synthetic={args.sets}",
        f"--config.data.synthetic_kinds={args.kinds}",
    ]


def finished(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(json.loads(line).get("step") == steps for line in f if line.strip())


def run_steps(run: str, args: argparse.Namespace) -> int:
    stage = {**RUNS, **FOLLOW_UP_RUNS}[run][0]
    if run in FOLLOW_UP_RUNS:
        return args.steps_2b_long
    return {"pretrain": args.steps_1, "finetune": args.steps_2a, "context": args.steps_2b}[stage]


def train(run: str, seed: int, args: argparse.Namespace) -> float | None:
    """Trains one run (the run it starts from must have finished); its wall seconds, None when it had finished."""
    stage, parent, own = {**RUNS, **FOLLOW_UP_RUNS}[run]
    workdirs, steps = args.workdirs, run_steps(run, args)
    workdir = os.path.join(workdirs, f"seed{seed}", run)
    if finished(workdir, steps):
        return None
    shutil.rmtree(workdir, ignore_errors=True)  # a run cut short would resume with another schedule's state
    init = [f"--config.init={os.path.join(workdirs, f'seed{seed}', parent)}"] if parent else []
    command = [
        sys.executable, "-m", "contextblip_jax.train", f"--config=configs/synthetic.py:stage={stage}",
        f"--workdir={workdir}", *common_flags(seed, steps, args), *init, *own,
    ]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - began
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "console.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"run {run} (seed {seed}) failed with status {done.returncode}; see {workdir}/console.log")
    return wall


def score(run: str, seed: int, args: argparse.Namespace) -> dict:
    stage, _, own = {**RUNS, **FOLLOW_UP_RUNS}[run]
    workdir = os.path.join(args.workdirs, f"seed{seed}", run)
    command = [
        sys.executable, "-m", "contextblip_jax.evaluate", f"--config=configs/synthetic.py:stage={stage}",
        f"--workdir={workdir}", "--checkpoint=latest", *common_flags(seed, run_steps(run, args), args),
        *own,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def partial_knowledge(root: str) -> dict[str, float]:
    """What a model that sees colour and kind but no detail (detail sets), or the shape's colour but not when it
    changed (recolour sets), would score by guessing among the candidates that share it: the level a model that
    has not learned what the kind was built to need reaches. From the validation split's records."""
    from contextblip_jax.data import scenes, synthetic

    found = synthetic.replayed(root)
    if found is None:
        sys.exit(f"{root} holds no data the generator wrote (no {synthetic.MANIFEST} of its version)")
    chances: dict[str, list[float]] = {"detail": [], "recolour": []}
    for image_set in found[1]:
        if image_set.split != "valid" or image_set.kind not in chances:
            continue
        if image_set.kind == "detail":
            looks = [(scene[0].colour, scene[0].shape) for scene in image_set.scenes]
        else:
            looks = scenes.recoloured(image_set.scenes)
        chances[image_set.kind] += [1 / looks.count(looks[target]) for target in image_set.descriptions]
    return {kind: sum(values) / len(values) for kind, values in chances.items()}


def training_losses(workdir: str) -> dict:
    """A run's training loss at its first and last logged step (and each loss term), and for a scored stage the
    first logged step whose loss is 1 below that of uniform scores (16 descriptions · ln 10 per batch): where it
    leaves the plateau at chance."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [row for row in map(json.loads, f) if row["split"] == "train"]
    terms = [key for key in ("loss", "itm", "tmim") if key in rows[0]]
    found = {
        f"{key}_{end}": round(row[key], 3) for key in terms for end, row in (("first", rows[0]), ("last", rows[-1]))
    }
    if "itm" not in rows[0]:  # stages 2a and 2b: a candidate loss summed over 16 descriptions
        chance = 16 * math.log(10)
        found["left_chance_at"] = next((row["step"] for row in rows if row["loss"] < chance - 1), None)
    return found


def append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds; every cell runs once per seed.")
    parser.add_argument("--steps_1", type=int, default=1000, help="Stage 1 steps (batch 16 captions).")
    parser.add_argument("--steps_2a", type=int, default=600, help="Stage 2a steps (batch 16 descriptions).")
    parser.add_argument("--steps_2b", type=int, default=400, help="Stage 2b steps (batch 16 descriptions).")
    parser.add_argument("--steps_2b_long", type=int, default=1600, help="Stage 2b steps of the follow-up.")
    parser.add_argument("--kinds", default=KINDS, help="The generated data's scene kinds and shares.")
    parser.add_argument("--sets", type=int, default=1000, help="Training sets generated (a fifth as many valid).")
    parser.add_argument("--workdirs", default=os.path.join(ROOT, "workdirs", "ablations"))
    parser.add_argument("--out", default=OUT, help="Folder of runs.jsonl and cells.jsonl (appended to).")
    parser.add_argument(
        "--follow_up", action="store_true", help="Only the follow-up cells (FOLLOW_UP_RUNS), not the grid's."
    )
    args = parser.parse_args()
    runs, cells = (FOLLOW_UP_RUNS, FOLLOW_UP_CELLS) if args.follow_up else (RUNS, CELLS)
    os.makedirs(args.out, exist_ok=True)
    stamp = {"machine": machine(), "date": datetime.date.today().isoformat()}
    for seed in (int(s) for s in args.seeds.split(",")):
        for run, (stage, parent, _) in runs.items():
            wall = train(run, seed, args)
            if wall is not None:
                row = {"run": run, "seed": seed, "stage": stage, "init": parent, "steps": run_steps(run, args)}
                row["follow_up"] = args.follow_up
                append(os.path.join(args.out, "runs.jsonl"), {**row, "wall_s": round(wall, 1), **stamp})
        for cell, run in cells.items():
            began = time.perf_counter()
            found = score(run, seed, args)
            steps = {"pretrain": args.steps_1, "finetune": args.steps_2a, "context": run_steps(run, args)}
            row = {"cell": cell, "run": run, "seed": seed, "kinds": args.kinds, "steps": steps}
            keys = ("acc", "acc_video", "acc_static", "acc_by_kind", "descriptions")
            figures = {k: found[k] for k in keys}
            append(
                os.path.join(args.out, "cells.jsonl"),
                {**row, **figures, "score_s": round(time.perf_counter() - began, 1), **stamp},
            )
    for seed in (int(s) for s in args.seeds.split(",")):
        for run in runs:
            losses = training_losses(os.path.join(args.workdirs, f"seed{seed}", run))
            append(os.path.join(args.out, "losses.jsonl"), {"run": run, "seed": seed, **losses})
    if not args.follow_up:  # the data exists once the first run has generated it
        with open(os.path.join(args.out, "partial_knowledge.json"), "w") as f:
            json.dump(partial_knowledge(os.path.join(args.workdirs, "data")), f, indent=1)


if __name__ == "__main__":
    main()
