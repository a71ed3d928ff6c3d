"""Convert a PyTorch BLIP or ContextBLIP checkpoint to an Orbax folder that the loaders and the trainer read.

    python -m contextblip_jax.convert --input SRC --output DIR [--target auto|blip|contextblip]
        [--image-size 224] [--dtype bfloat16] [--model-config JSON]

SRC: a Hugging Face BLIP folder, a `.safetensors` / `.bin` file, an original salesforce/BLIP `.pth`, or one of
the ContextBLIP authors' stage checkpoints. Every missing, unused or mis-shaped key is reported by name and
nothing is written to DIR.

Imports: its own package (`convert`), `cli`, `models`; a command (it defines flags), so no module imports it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import app, flags, logging

from contextblip_jax import cli
from contextblip_jax.convert import directory
from contextblip_jax.convert.contextblip import full_params
from contextblip_jax.convert.dispatch import TARGETS, convert_any, with_image_size
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.models.config import read_partial

_INPUT = flags.DEFINE_string("input", None, "PyTorch checkpoint: HF folder, .safetensors, .bin, .pth or .pt.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create with the Orbax checkpoint and model config.")
_MODEL_CONFIG = flags.DEFINE_string(
    "model-config",
    None,
    "Partial model config overriding the source's, as inline JSON or a JSON file path, e.g. "
    '\'{"vision": {"num_heads": 16}}\' (BLIP) or \'{"blip": {...}, "tmim": {...}}\' (ContextBLIP). Fields the '
    "tensors determine must agree with them.",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image-size", None, "Resolution to run at; position embeddings are resampled (bicubic) if it differs."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Storage dtype of the parameters.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output folder.")
_TARGET = flags.DEFINE_enum(
    "target",
    "auto",
    list(TARGETS),
    "What to build: `blip` (BlipRetrieval), `contextblip` (ContextBLIP; from a BLIP source its new parts start "
    "fresh), or `auto` (contextblip for the authors' checkpoints, blip otherwise).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fresh initialisation of ContextBLIP parts the source lacks.")


def _overrides() -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if _MODEL_CONFIG.value:
        try:
            overrides = read_partial(_MODEL_CONFIG.value)
        except ValueError as error:
            raise ConversionError(_MODEL_CONFIG.value, [f"--model-config: {error}"]) from error
    nested = "blip" in overrides or _TARGET.value == "contextblip"
    return with_image_size(overrides, _IMAGE_SIZE.value, nested)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    try:
        directory.check_output(_OUTPUT.value, _OVERWRITE.value)
        logging.info("reading and checking %s", _INPUT.value)
        conversion = convert_any(_INPUT.value, _TARGET.value, _overrides())
    except ConversionError as error:
        cli.fail(error)
    params = conversion.params
    if conversion.model == "contextblip":
        params = full_params(conversion.config, params, seed=_SEED.value)
    count = sum(p.size for p in params.values())
    logging.info("writing %s (%s model, %s)", _OUTPUT.value, conversion.model, _DTYPE.value)
    metadata = {**conversion.metadata, "source": os.path.abspath(_INPUT.value), "dtype": _DTYPE.value}
    directory.write_converted(
        _OUTPUT.value,
        config_json=conversion.config.to_json(),
        params=params,
        metadata=metadata,
        tokenizer_dir=conversion.tokenizer_dir,
    )
    logging.info(
        "converted %s -> %s: %d parameters, %.1fs", _INPUT.value, _OUTPUT.value, count, time.perf_counter() - start
    )


def run() -> None:
    """`contextblip-convert`: the same as `python -m contextblip_jax.convert`."""
    cli.run(main, required=["input", "output"])


if __name__ == "__main__":
    run()
