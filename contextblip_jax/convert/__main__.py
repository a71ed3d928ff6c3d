"""Convert a PyTorch BLIP checkpoint to an Orbax folder that `load_blip` and the trainer read.

    python -m contextblip_jax.convert --input SRC --output DIR [--image-size 224] [--dtype bfloat16]

SRC: a Hugging Face BLIP folder, a `.safetensors` / `.bin` file, or an original salesforce/BLIP `.pth`.
Every missing, unused or mis-shaped key is reported by name and nothing is written to DIR.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging

from contextblip_jax.convert import directory
from contextblip_jax.convert.blip import convert_blip
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.sources import read_checkpoint

_INPUT = flags.DEFINE_string("input", None, "PyTorch checkpoint: HF folder, .safetensors, .bin, .pth or .pt.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create with the Orbax checkpoint and model config.")
_MODEL_CONFIG = flags.DEFINE_string(
    "model-config",
    None,
    "Partial model config overriding the source's, as inline JSON or a JSON file path, e.g. "
    '\'{"vision": {"num_heads": 16}}\'. Fields the tensors determine must agree with them.',
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image-size", None, "Resolution to run at; position embeddings are resampled (bicubic) if it differs."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of the parameters.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output folder.")


def _overrides() -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if _MODEL_CONFIG.value:
        text = _MODEL_CONFIG.value
        if os.path.isfile(text):
            with open(text) as f:
                text = f.read()
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConversionError(_MODEL_CONFIG.value, [f"--model-config is not valid JSON: {error}"]) from error
        if not isinstance(overrides, dict):
            raise ConversionError(_MODEL_CONFIG.value, ["--model-config must be a JSON object"])
    if _IMAGE_SIZE.value:
        overrides["vision"] = {**overrides.get("vision", {}), "image_size": _IMAGE_SIZE.value}
    return overrides


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    try:
        directory.check_output(_OUTPUT.value, _OVERWRITE.value)
        overrides = _overrides()
        logging.info("reading %s", _INPUT.value)
        raw = read_checkpoint(_INPUT.value)
        source_format, tokenizer_dir = raw.format, raw.tokenizer_dir
        logging.info("read %d tensors (%s); checking and converting", len(raw.tensors), source_format)
        converted = convert_blip(raw, overrides)
    except (ConversionError, FileExistsError) as error:
        sys.exit(f"error: {error}")
    logging.info("writing %s (%s)", _OUTPUT.value, _DTYPE.value)
    directory.write_converted(
        _OUTPUT.value,
        converted,
        source=_INPUT.value,
        source_format=source_format,
        dtype=_DTYPE.value,
        tokenizer_dir=tokenizer_dir,
    )
    count = sum(p.size for p in converted.params.values())
    logging.info(
        "converted %s -> %s: %d parameters, %.1fs", _INPUT.value, _OUTPUT.value, count, time.perf_counter() - start
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output"])
    app.run(main)
