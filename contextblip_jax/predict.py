"""`python -m contextblip_jax.predict --workdir=W --text="..." --images=DIR`: rank a set's images for a
description with a trained run's best model (`--checkpoint=best`, the default; `latest` or a step number) and
print them, best first, with their scores: a JSON object `{"text", "stage", "ranking"}`. `--text` may be repeated:
the set's images are then encoded once for all the descriptions (as evaluation groups a set's descriptions,
`data/grouped.py`) and a JSON list holds one such object per description, in the order given.

DIR holds the candidates as ImageCoDe stores them (`imgX.jpg`, ordered by X); a folder whose name contains
`open-images` is a static set, any other a video set (the inter-context encoder's positions apply).
`--config` (optional) is the run's config: the description is cleaned (`data.pre_caption_words`, `pre_caption_rules`)
and tokenised (`max_text_length`, `vocab`, `first_token`) as the run's own texts were; without it the text is used
as given, with the bundled vocabulary, `[ENC]` first and up to 64 tokens.

`--explain=OUT.png` (one `--text`) also writes the ranked candidates, best first, each with its heatmap: what the
matching pass looked at, the gradient-weighted cross-attention at text layer `--heatmap_layer`
(`evaluation/explain.py`).

Imports: `cli`, `checkpoints`, `data`, `evaluation`, `models`, `runconfig`, `stages`; a command (it defines flags),
so no module imports it.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from contextblip_jax import cli, runconfig, stages
from contextblip_jax.checkpoints import weights
from contextblip_jax.data import imagecode
from contextblip_jax.data.preprocess import load_image
from contextblip_jax.evaluation import explain
from contextblip_jax.evaluation.scorer import ranking, set_scores
from contextblip_jax.models import gradcam

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder (model_config.json + checkpoints).")
_TEXT = flags.DEFINE_multi_string("text", None, "A description; repeat for several, which share the image work.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config, for its text handling (optional).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best (W/best.json; else the latest), latest, or a step.")
_IMAGES = flags.DEFINE_string("images", None, "Folder of candidate images (imgX.jpg).")
_STAGE = flags.DEFINE_enum(
    "stage", "context", [name for name, row in stages.STAGES.items() if row.evaluates], "Which scores to rank by."
)
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length",
    None,
    "Tokens of the description (default: the config's data.max_text_length, else 64; fewer if the model has fewer "
    "positions).",
)
_EXPLAIN = flags.DEFINE_string("explain", None, "Write the ranked candidates with their heatmaps to this PNG.")
_LAYER = flags.DEFINE_integer("heatmap_layer", 0, "Text layer the heatmaps weight (0 first, -1 last).")
_RULE = flags.DEFINE_enum("heatmap_rule", "gradcam", list(gradcam.RULES), "The heatmap (evaluate's --heatmap_rule).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    found = weights.run_model(_WORKDIR.value, choice=runconfig.check_choice(_CHECKPOINT.value))
    if found is None:
        raise app.UsageError(f"{_WORKDIR.value} holds no training checkpoint")
    model, _ = found
    config = model.config
    names = sorted(
        (n for n in os.listdir(_IMAGES.value) if imagecode.frame_number(n) is not None), key=imagecode.frame_number
    )
    if not names:
        raise app.UsageError(f"{_IMAGES.value} holds no imgX.jpg files")
    size = config.blip.vision.image_size
    images = jnp.asarray(np.stack([load_image(os.path.join(_IMAGES.value, n), size) for n in names]))[None]
    data = None
    if _CONFIG.value:
        data = runconfig.data_config(runconfig.prepare(_CONFIG.value, data=False, weights=False), train=False)
    if _EXPLAIN.value and len(_TEXT.value) != 1:
        raise app.UsageError("--explain draws one description: give exactly one --text")
    texts = explain.Texts(data)
    length = _MAX_LENGTH.value or min(texts.max_length, config.blip.text.max_positions)
    ids, mask = texts(_TEXT.value, length)
    is_video = not imagecode.is_static(os.path.basename(os.path.normpath(_IMAGES.value)))
    scores = set_scores(model, _STAGE.value, images, ids, mask, is_video)
    if _EXPLAIN.value:
        paths = [os.path.join(_IMAGES.value, n) for n in names]
        found = explain.set_heatmaps(model, _STAGE.value, paths, (ids, mask), size, _LAYER.value, _RULE.value)
        explain.ranked_grid(_EXPLAIN.value, _TEXT.value[0], paths, scores[0], found.maps[0], names)
    results = [
        {"text": text, "stage": _STAGE.value, "ranking": ranking(row, names)}
        for text, row in zip(_TEXT.value, scores, strict=True)
    ]
    print(json.dumps(results[0] if len(results) == 1 else results, indent=1))


def run() -> None:
    """`contextblip-predict`: the same as `python -m contextblip_jax.predict`."""
    cli.run(main, required=["workdir", "text", "images"])


if __name__ == "__main__":
    run()
