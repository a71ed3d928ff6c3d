"""PyTorch BLIP / ContextBLIP checkpoints -> Flax.

`load_blip` and `load_contextblip` for code (`read_contextblip` for a model built in its shards, `weights.py`),
`python -m contextblip_jax.convert` for files.

Modules here import the model configs and modules, `run_state.py` (Orbax) and each other; PyTorch is
imported only where a pickle is read.

Imports, for every module here: each other and `cli`, `data`, `files`, `models`, `storage`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from contextblip_jax import files, storage
from contextblip_jax.convert import directory
from contextblip_jax.convert.blip import build_model
from contextblip_jax.convert.contextblip import build_contextblip
from contextblip_jax.convert.dispatch import convert_any, with_image_size
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.models.blip import BlipRetrieval
from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.vit import resample_posemb

__all__ = ["ConversionError", "itm_first_token", "load_blip", "load_contextblip", "read_contextblip"]

ShardingsFor = Callable[[ContextBLIPConfig], storage.Shardings]
"""A ContextBLIP architecture -> its parameters' shardings by dotted name (`read_contextblip`)."""


def load_blip(
    path: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    image_size: int | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> BlipRetrieval:
    """A `BlipRetrieval` from a converted folder or straight from any supported PyTorch BLIP checkpoint.

    `image_size` resamples the position embeddings to another resolution (e.g. 224 for a 384-px checkpoint);
    `model_config` is a partial config overriding what the source says (PyTorch sources only).
    """
    path = os.fspath(path)
    if directory.is_converted(path):
        config, params, metadata = _read(path, model_config, image_size)
        if metadata.get("model", "blip") != "blip":
            raise ValueError(f"{path} holds a ContextBLIP model: use load_contextblip")
        return build_model(config, params, dtype)
    conversion = convert_any(path, "blip", with_image_size(model_config, image_size, nested=False))
    return build_model(conversion.config, conversion.params, dtype)


def load_contextblip(
    path: str,
    *,
    dtype: jnp.dtype = jnp.float32,
    image_size: int | None = None,
    model_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    init: str | None = None,
) -> ContextBLIP:
    """A `ContextBLIP` from a converted folder, an authors' checkpoint, or a plain BLIP checkpoint.

    Parts the source lacks (everything but BLIP for a BLIP checkpoint; TMIM or the heads for the authors' stage
    files) start from a fresh initialisation drawn from `seed` as `init` says (`ContextBLIPConfig.init`; None: the
    default of the config built from the source, or the one a converted ContextBLIP folder records).
    """
    config, params = read_contextblip(path, image_size=image_size, model_config=model_config)
    return build_contextblip(config, params, dtype, seed, init)


def read_contextblip(
    path: str,
    *,
    image_size: int | None = None,
    model_config: Mapping[str, Any] | None = None,
    shardings: ShardingsFor | None = None,
) -> tuple[ContextBLIPConfig, dict[str, Any]]:
    """The ContextBLIP architecture and the parameters `path` holds (arguments as `load_contextblip`'s), without
    building a model: parts the source lacks are absent from the parameters.

    With `shardings`, a converted folder's parameters are read straight into their shards, each process reading
    only the slices its devices hold; the ViT position embedding, when resampled to `image_size`, is read to the
    host first (it is small). A PyTorch checkpoint is converted whole on the host whatever `shardings` says:
    conversion needs the file's tensors.
    """
    path = os.fspath(path)
    if not directory.is_converted(path):
        conversion = convert_any(path, "contextblip", with_image_size(model_config, image_size, nested=True))
        return conversion.config, conversion.params
    config, params, metadata = _read(path, model_config, image_size, shardings)
    if metadata.get("model", "blip") == "blip":
        config = ContextBLIPConfig(blip=config)
        params = {f"blip.{name}": value for name, value in params.items()}
    return config, params


def itm_first_token(path: str) -> str:
    """The first token BLIP's ITM pass expects for this checkpoint.

    `enc` for original salesforce/BLIP and ContextBLIP `.pth`/`.pt` files (their code replaces [CLS] by [ENC]),
    `cls` for Hugging Face folders and files (its processor keeps [CLS]); converted folders remember theirs.
    """
    path = os.fspath(path)
    if directory.is_converted(path):
        return directory.read_metadata(path)["itm_first_token"]
    return "enc" if path.lower().endswith((".pth", ".pt")) else "cls"


def _read(
    path: str, model_config: Mapping[str, Any] | None, image_size: int | None, shardings: ShardingsFor | None = None
) -> tuple[BlipConfig | ContextBLIPConfig, dict[str, Any], dict[str, Any]]:
    if model_config:
        raise ValueError(f"{path} is already converted; its architecture cannot be overridden")
    if shardings is None:
        config, params, metadata = directory.read_converted(path)
    else:
        config, metadata = _damage_named(path, lambda: _architecture(path))
    blip = config.blip if isinstance(config, ContextBLIPConfig) else config
    prefix = "blip." if isinstance(config, ContextBLIPConfig) else ""
    name = f"{prefix}vision.pos_embed"
    resampled = bool(image_size) and image_size != blip.vision.image_size
    if resampled:
        changes = {"vision": {"image_size": image_size}}
        config = config.override({"blip": changes} if prefix else changes)
    if shardings is not None:
        outer = "" if prefix else "blip."  # a BLIP folder's names lack the `blip.` of ContextBLIP's
        wanted = shardings(config if prefix else ContextBLIPConfig(blip=config))
        wanted = {key[len(outer) :]: value for key, value in wanted.items() if key.startswith(outer)}
        if resampled:
            del wanted[name]
        params_dir = files.join(path, directory.PARAMS_DIR)
        params = _damage_named(path, lambda: storage.restore_params(params_dir, wanted))
    if resampled:
        params[name] = resample_posemb(params[name], image_size // blip.vision.patch_size)
    return config, params, metadata


def _architecture(path: str) -> tuple[BlipConfig | ContextBLIPConfig, dict[str, Any]]:
    """A converted folder's architecture and metadata, as `directory.read_converted` reads them."""
    metadata = directory.read_metadata(path)
    config_class = ContextBLIPConfig if metadata.get("model") == "contextblip" else BlipConfig
    return config_class.from_json(files.read_text(files.join(path, directory.CONFIG_FILE))), metadata


def _damage_named(path: str, read: Callable[[], Any]) -> Any:
    """`read()`, any failure refused as `directory.read_converted` refuses it: naming the folder and the failure."""
    try:
        return read()
    except Exception as error:  # Orbax and tensorstore raise many types; each one is reported
        raise storage.DamagedCheckpointError(
            f"the converted weights in {path} do not read back ({storage.read_failure(error)}); convert them again "
            "(python -m contextblip_jax.convert)"
        ) from error
