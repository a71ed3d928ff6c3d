"""The layout of a converted-weights folder.

```
DIR/model_config.json   the architecture (BlipConfig as JSON)
DIR/conversion.json     model (blip | contextblip), source path and format, storage dtype, ITM first token,
                        dropped extras; for ContextBLIP the source stage and the freshly initialised parts
DIR/params/             Orbax checkpoint of the flat parameter dict
DIR/tokenizer/          the source's tokenizer files, when it had any
```
The folder is assembled beside DIR and renamed into place, so a failed conversion leaves no DIR behind.

Imports: its own package (`convert`), `files`, `models`, `storage`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from contextblip_jax import files, storage
from contextblip_jax.convert.blip import to_dtype
from contextblip_jax.convert.sources import TOKENIZER_FILES
from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig

CONFIG_FILE = "model_config.json"
METADATA_FILE = "conversion.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def is_converted(path: str) -> bool:
    """Whether `path` (a local folder or a `gs://` URL) holds a converted model: its config and its params."""
    return files.exists(files.join(path, CONFIG_FILE)) and files.is_dir(files.join(path, PARAMS_DIR))


def check_output(output: str, overwrite: bool) -> None:
    """Refuses a non-empty DIR unless asked to overwrite it; call before any slow work."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{output} is not empty; pass --overwrite to replace it")


def write_converted(
    output: str,
    *,
    config_json: str,
    params: Mapping[str, Any],
    metadata: Mapping[str, Any],
    tokenizer_dir: str | None,
) -> None:
    """Writes DIR; `metadata` must name the storage `dtype` and the `model` (`blip` or `contextblip`)."""
    staging = f"{output.rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            f.write(config_json)
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(dict(metadata), f, indent=2, sort_keys=True)
        if tokenizer_dir:
            _copy_tokenizer(tokenizer_dir, os.path.join(staging, TOKENIZER_DIR))
        storage.save_params(os.path.join(staging, PARAMS_DIR), to_dtype(params, metadata["dtype"]))
        shutil.rmtree(output, ignore_errors=True)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_converted(path: str) -> tuple[BlipConfig | ContextBLIPConfig, dict[str, np.ndarray], dict[str, Any]]:
    """(architecture, parameters, metadata) of a converted folder; the metadata says which model it holds.
    A folder that does not read back whole (truncated or missing arrays, garbled JSON) is a
    `DamagedCheckpointError` naming the folder and what failed."""
    try:
        metadata = read_metadata(path)
        config_class = ContextBLIPConfig if metadata.get("model") == "contextblip" else BlipConfig
        config = config_class.from_json(files.read_text(files.join(path, CONFIG_FILE)))
        params = storage.restore_params(files.join(path, PARAMS_DIR))
    except Exception as error:  # Orbax and tensorstore raise many types; each one is reported
        raise storage.DamagedCheckpointError(
            f"the converted weights in {path} do not read back ({storage.read_failure(error)}); convert them again "
            "(python -m contextblip_jax.convert)"
        ) from error
    return config, params, metadata


def read_metadata(path: str) -> dict[str, Any]:
    return json.loads(files.read_text(files.join(path, METADATA_FILE)))


def _copy_tokenizer(source: str, destination: str) -> None:
    os.makedirs(destination)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), destination)
