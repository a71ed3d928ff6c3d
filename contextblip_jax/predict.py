"""`python -m contextblip_jax.predict --workdir=W --text="..." --images=DIR`: rank a set's images for one
description with a trained run's latest checkpoint and print them, best first, with their scores.

DIR holds the candidates as ImageCoDe stores them (`imgX.jpg`, ordered by X); a folder whose name contains
`open-images` is a static set, any other a video set (the inter-context encoder's positions apply).

Imports: the run's weights, the stage table, the data readers.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from contextblip_jax import stages, weights
from contextblip_jax.data import imagecode
from contextblip_jax.data.preprocess import BlipTokenizer, load_image

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder (model_config.json + checkpoints).")
_TEXT = flags.DEFINE_string("text", None, "The description.")
_IMAGES = flags.DEFINE_string("images", None, "Folder of candidate images (imgX.jpg).")
_STAGE = flags.DEFINE_enum(
    "stage", "context", [name for name, row in stages.STAGES.items() if row.evaluates], "Which scores to rank by."
)
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", None, "Tokens of the description (default: 64, or fewer if the model has fewer positions)."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    found = weights.run_model(_WORKDIR.value)
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
    length = _MAX_LENGTH.value or min(64, config.blip.text.max_positions)
    ids, mask = BlipTokenizer()([_TEXT.value], length, "enc")
    is_video = jnp.array([not imagecode.is_static(os.path.basename(os.path.normpath(_IMAGES.value)))])
    batch = {"images": images, "input_ids": ids, "attention_mask": mask, "is_video": is_video}
    scores = np.asarray(jax.device_get(stages.get(_STAGE.value).score(model, batch)))[0]
    ranking = [
        {"rank": rank + 1, "index": int(i), "image": names[i], "score": round(float(scores[i]), 4)}
        for rank, i in enumerate(np.argsort(-scores))
    ]
    print(json.dumps({"text": _TEXT.value, "stage": _STAGE.value, "ranking": ranking}, indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "text", "images"])
    app.run(main)
