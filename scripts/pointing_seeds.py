"""The pointing test of the heatmaps on the README's main job, per seed and text layer: trains the main job for
each seed (unless its workdir already finished), writes `evaluate --report` for each layer, and appends one JSON
line per (seed, model, layer) to docs/report/pointing.jsonl (hit rate, both chance levels, accuracy, the report's
seconds, machine, date). Two controls can come with it: `--zero_shot`, the trained towers scored by the ITM head
(which 2a never trains), and `--untrained`, the same architecture at its random initialisation (the seed's).
The README's pointing table is generated from that file (`python -m contextblip_jax.doctables`).

    python scripts/pointing_seeds.py --seeds=0,1,2 --layers=0,1 --rules=gradcam,gradient --zero_shot --untrained
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

from main_job_seeds import ROOT, machine

OUT = os.path.join(ROOT, "docs", "report", "pointing.jsonl")


def report(workdir: str, out: str, stage: str, layer: int, rule: str, *extra: str) -> dict:
    command = [
        sys.executable, "-m", "contextblip_jax.evaluate", f"--config=configs/synthetic.py:stage={stage}",
        f"--workdir={workdir}", f"--report={out}", f"--heatmap_layer={layer}", f"--heatmap_rule={rule}", *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--layers", default="0,1", help="Text layers whose cross-attention the maps weight.")
    parser.add_argument("--rules", default="gradcam", help="Heatmap rules (evaluate's --heatmap_rule).")
    parser.add_argument("--zero_shot", action="store_true", help="Also the ITM head's maps (stage zeroshot).")
    parser.add_argument("--untrained", action="store_true", help="Also the randomly initialised model's maps.")
    parser.add_argument("--no_trained", action="store_true", help="Only the controls (the runs already reported).")
    parser.add_argument(
        "--kinds", default="", help="The generated data's scene kinds (data.synthetic_kinds); empty: the main job's."
    )
    parser.add_argument("--workdirs", default=os.path.join(ROOT, "workdirs", "pointing"))
    args = parser.parse_args()
    kinds = args.kinds or "attributes:0.3,motion:0.7"
    data = (
        [f"--config.data.synthetic_kinds={args.kinds}", f"--config.data.root=workdirs/data-{kinds}"]
        if args.kinds
        else []
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        workdir = os.path.join(args.workdirs, f"{args.kinds}-seed{seed}" if args.kinds else f"seed{seed}")
        if not os.path.exists(os.path.join(workdir, "best.json")):
            train = [sys.executable, "-m", "contextblip_jax.train", "--config=configs/synthetic.py",
                     f"--workdir={workdir}", f"--config.seed={seed}", *data]  # fmt: skip
            subprocess.run(train, cwd=ROOT, check=True, capture_output=True)
        models = [] if args.no_trained else [("finetune", "finetune", workdir, ())]
        if args.zero_shot:
            models.append(("zeroshot", "zeroshot", workdir + "-zeroshot", (f"--config.init={workdir}",)))
        if args.untrained:
            models.append(("untrained", "finetune", workdir + "-untrained", (f"--config.seed={seed}",)))
        for name, stage, run_dir, extra in models:
            for rule, layer in ((r, int(v)) for r in args.rules.split(",") for v in args.layers.split(",")):
                out = os.path.join(workdir, f"report-{name}-{rule}-layer{layer}")
                found = report(run_dir, out, stage, layer, rule, *extra, *data)
                row = {
                    "kinds": kinds,
                    "seed": seed,
                    "stage": name,
                    "layer": layer,
                    "rule": rule,
                    "acc": found["acc"],
                    **found["pointing"],
                    "report_s": found["report_seconds"],
                    "machine": machine(),
                    "date": datetime.date.today().isoformat(),
                    "command": f"python -m contextblip_jax.evaluate --config=configs/synthetic.py:stage={stage} "
                    f"--workdir=W --report=DIR --heatmap_layer={layer} --heatmap_rule={rule}",
                }
                with open(OUT, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
