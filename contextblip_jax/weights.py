"""Where a run's weights come from: random initialisation, a converted or PyTorch checkpoint (`config.init`), or
a training run's latest checkpoint; and the architecture file that ties a workdir's checkpoints to a model.

Imports: the model, conversion (`convert/`), `checkpoint.py` and the run-config helpers; never the trainer.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from contextblip_jax import checkpoint, trainconfig
from contextblip_jax.convert import directory, load_contextblip
from contextblip_jax.convert.contextblip import build_contextblip
from contextblip_jax.models.config import ContextBLIPConfig, flatten_dict
from contextblip_jax.models.contextblip import ContextBLIP

MODEL_CONFIG_FILE = directory.CONFIG_FILE
"""A workdir's architecture, written before its first checkpoint (named as in a converted folder)."""


def run_params(workdir: str) -> tuple[ContextBLIPConfig, dict[str, np.ndarray], int] | None:
    """The architecture, newest intact parameters and their step of the training run in `workdir`; None if it
    has no checkpoint (damaged newer checkpoints are named in a warning; `checkpoint.DamagedCheckpointError`
    when none reads back)."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    checkpoints = checkpoint.RunCheckpoints(workdir)
    try:
        found = checkpoints.latest_params()  # the newest intact one; damaged ones are named
    finally:
        checkpoints.close()
    if found is None:
        return None
    step, params = found
    with open(path) as f:
        config = ContextBLIPConfig.from_json(f.read())
    return config, params, step


def run_model(workdir: str, dtype: jnp.dtype = jnp.float32) -> tuple[ContextBLIP, int] | None:
    """The model at the latest checkpoint of the training run in `workdir` and its step; None if it has none."""
    found = run_params(workdir)
    if found is None:
        return None
    config, params, step = found
    return build_contextblip(config, params, dtype), step


def initial_model(config: ml_collections.ConfigDict) -> tuple[ContextBLIP, str]:
    """The model a run starts from, and where it came from (random, a checkpoint, or a previous stage)."""
    dtype = jnp.dtype(config.dtype)
    if not config.init:
        model = ContextBLIP(trainconfig.model_config(config), dtype=dtype, rngs=nnx.Rngs(config.seed))
        return model, "random initialisation"
    if not os.path.exists(config.init):
        raise FileNotFoundError(f"init {config.init} does not exist")
    previous = run_model(config.init, dtype) if os.path.isdir(config.init) else None
    if previous is not None:
        return previous[0], f"the latest checkpoint of {config.init}"
    if (
        os.path.isdir(config.init)
        and not directory.is_converted(config.init)
        and not os.path.exists(os.path.join(config.init, "config.json"))
    ):
        raise FileNotFoundError(f"init {config.init} holds neither a run checkpoint nor convertible weights")
    image_size = config.model.blip.vision.image_size
    return load_contextblip(config.init, dtype=dtype, image_size=image_size, seed=config.seed), config.init


def check_resume(workdir: str, config: ContextBLIPConfig) -> None:
    """A workdir's checkpoints only fit the architecture they were saved with: a different one is an error
    naming every differing field, raised before anything is compiled or restored."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    with open(path) as f:
        saved = flatten_dict(json.load(f))
    given = flatten_dict(json.loads(config.to_json()))
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, config {given.get(key)!r}"
        for key in sorted(set(saved) | set(given))
        if saved.get(key) != given.get(key)
    ]
    if differences:
        raise ValueError(f"{workdir} holds checkpoints of another architecture: " + "; ".join(differences))


def save_model_config(workdir: str, model: ContextBLIP) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
            f.write(model.config.to_json())
