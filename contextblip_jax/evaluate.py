"""`python -m contextblip_jax.evaluate --config=... --workdir=W [--split=valid|test|mmvp]`.

Scores every description of a split against its 10 candidates with the run's best model (`W/best.json`; with
`--checkpoint=latest` or `=STEP` another checkpoint; when W has none, e.g. for the zero-shot stage, the weights
named by `config.init`) and prints accuracy overall / video / static as JSON, with the work it took: `sets`,
`images_encoded` (the real images encoded: 10 per set slot filled with `eval.group_by_set`, which is 10 per set
unless a set has more descriptions than a shard's slots; 10 per description without; padding slots are not
counted), and the scoring pass's `seconds` and `descriptions_per_s`; on generated data (the main job's folder)
also `acc_by_kind`, the accuracy per scene kind. On the test split it writes the leaderboard file
`W/test_predictions.json`: `{set_name: [index, ...]}` in file order. `--split=mmvp --mmvp_root=PATH` prints
MMVP-VLM pair accuracy per category, overall and the category mean.

`--report=DIR` (a labelled split) also writes a static report into the local folder DIR (`evaluation/report.py`:
`index.html` with accuracy breakdowns, the `--report_hardest` hardest descriptions and `--report_correct` correct
ones with every candidate's rank, score and heatmap at text layer `--heatmap_layer` by `--heatmap_rule`; on
generated data the pointing test) and adds `report` (its path) and `pointing` to the printed JSON.

Imports: `cli`, `data`, `evaluation`, `files`, `models`, `runconfig`; a command (it defines flags), so no module
imports it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from contextblip_jax import cli, files, runconfig
from contextblip_jax.data import synthetic
from contextblip_jax.evaluation.evaluators import ImageCodeEvaluator
from contextblip_jax.evaluation.report import write_report
from contextblip_jax.evaluation.scorer import mmvp_accuracy, scorer
from contextblip_jax.evaluation.scoring import LEADERBOARD_FILE, accuracy, accuracy_by, leaderboard
from contextblip_jax.models import gradcam

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/synthetic.py:stage=finetune.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's folder (checkpoints; the leaderboard file goes here).")
_SPLIT = flags.DEFINE_enum("split", "valid", ["valid", "test", "mmvp"], "ImageCoDe split, or MMVP-VLM.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    "best",
    "Which of the run's models to score: best (the one W/best.json names; the latest when the run never "
    "evaluated), latest, or a step number.",
)
_MMVP_ROOT = flags.DEFINE_string("mmvp_root", None, "MMVP-VLM folder (Questions.csv + 'MLLM_VLM Images/').")
_REPORT = flags.DEFINE_string("report", None, "Local folder for the HTML report (index.html); a labelled split.")
_HARDEST = flags.DEFINE_integer("report_hardest", 8, "Descriptions with the worst target rank shown in the report.")
_CORRECT = flags.DEFINE_integer("report_correct", 4, "Correctly ranked descriptions shown, drawn at random (seed 0).")
_LAYER = flags.DEFINE_integer(
    "heatmap_layer", 0, "Text layer whose cross-attention the heatmaps weight (0 first, -1 last).", lower_bound=-64
)
_RULE = flags.DEFINE_enum(
    "heatmap_rule", "gradcam", list(gradcam.RULES), "gradcam: attention x positive gradient; gradient: the latter only."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = _WORKDIR.value
    # `init` is read only when the run holds no checkpoint (weights.initial_model checks it then): a trained run
    # scores after its starting weights have been moved away.
    config = runconfig.prepare(_CONFIG.value, data=_SPLIT.value != "mmvp", weights=False)
    scoring = scorer(config, workdir, runconfig.check_choice(_CHECKPOINT.value))
    if _SPLIT.value == "mmvp":
        if not _MMVP_ROOT.value:
            raise app.UsageError("--split=mmvp needs --mmvp_root")
        print(json.dumps({"split": "mmvp", "step": scoring.step, **mmvp_accuracy(config, scoring, _MMVP_ROOT.value)}))
        return
    if _REPORT.value and (_SPLIT.value == "test" or files.is_url(_REPORT.value)):
        raise app.UsageError("--report needs a labelled split (valid) and a local folder")
    data = runconfig.data_config(config, train=False)
    evaluator = ImageCodeEvaluator(data, _SPLIT.value, scoring.mesh, config.eval.group_by_set, config.eval.set_slots)
    start = time.perf_counter()
    scored = evaluator.collect(scoring.predict)
    scores = scored.pop("output")
    scored["prediction"] = scores.argmax(axis=-1) if scores.size else scores.reshape(0).astype(int)
    seconds = time.perf_counter() - start
    work = {
        "sets": evaluator.sets,
        "images_encoded": evaluator.images_encoded,
        "seconds": round(seconds, 3),
        "descriptions_per_s": round(scored["example_id"].size / seconds, 3),
    }
    result: dict[str, Any] = {"split": _SPLIT.value, "step": scoring.step, **accuracy(scored), **work}
    kinds = synthetic.set_kinds(data.root) if data.source == "folder" and _SPLIT.value != "test" else None
    if kinds is not None:
        result["acc_by_kind"] = accuracy_by(scored, evaluator.source.examples, kinds)
    if _REPORT.value and jax.process_index() == 0:
        if getattr(evaluator.source, "examples", None) is None:
            raise app.UsageError("--report reads an ImageCoDe folder (data.source=folder), not array_record files")
        summary = write_report(
            _REPORT.value,
            {**scored, "output": scores},
            evaluator.source.examples,
            scoring.model,
            config.stage,
            data,
            layer=_LAYER.value,
            rule=_RULE.value,
            hardest=_HARDEST.value,
            correct=_CORRECT.value,
            boxes=synthetic.scene_boxes(data.root) if data.source == "folder" else None,
            about={"workdir": workdir, "split": _SPLIT.value, "step": scoring.step},
        )
        result.update(report=_REPORT.value, pointing=summary.get("pointing"), report_seconds=summary["seconds"])
    if _SPLIT.value == "test":
        path = files.join(workdir, LEADERBOARD_FILE)
        if jax.process_index() == 0:
            files.write_text(path, json.dumps(leaderboard(scored, evaluator.source.examples), indent=1))
        result = {
            "split": "test",
            "step": scoring.step,
            "descriptions": int(scored["example_id"].size),
            "leaderboard": path,
            **work,
        }
    print(json.dumps(result))


def run() -> None:
    """`contextblip-evaluate`: the same as `python -m contextblip_jax.evaluate`."""
    cli.run(main, required=["config", "workdir"])


if __name__ == "__main__":
    run()
