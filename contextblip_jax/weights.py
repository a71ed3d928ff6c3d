"""Where a run's weights come from: random initialisation, a converted or PyTorch checkpoint (`config.init`), or
a training run's best or latest checkpoint (`best.py`); and the architecture file that ties a workdir's
checkpoints to a model.

Imports: the model, conversion (`convert/`), `checkpoint.py`, `best.py` and the run-config helpers; never the trainer.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from contextblip_jax import best, checkpoint, trainconfig
from contextblip_jax.convert import directory, load_contextblip
from contextblip_jax.convert.contextblip import build_contextblip
from contextblip_jax.models.config import ContextBLIPConfig, flatten_dict
from contextblip_jax.models.contextblip import ContextBLIP

MODEL_CONFIG_FILE = directory.CONFIG_FILE
"""A workdir's architecture, written before its first checkpoint (named as in a converted folder)."""


def run_params(workdir: str, choice: str = "best") -> tuple[ContextBLIPConfig, dict[str, np.ndarray], int] | None:
    """The architecture, parameters and step of the training run in `workdir`; None if it has no checkpoint.

    `choice`: `best` (the model `W/best.json` names; the latest when the run never evaluated, e.g. stage 1),
    `latest` (the newest intact checkpoint; damaged newer ones are named in a warning,
    `checkpoint.DamagedCheckpointError` when none reads back) or a step number."""
    best.check_choice(choice)
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    found = _chosen_params(workdir, choice)
    if found is None:
        return None
    step, params = found
    with open(path) as f:
        config = ContextBLIPConfig.from_json(f.read())
    return config, params, step


def _chosen_params(workdir: str, choice: str) -> tuple[int, dict[str, np.ndarray]] | None:
    recorded = best.read(workdir) if choice == "best" else None
    if choice == "best" and recorded is None:
        logging.info("%s has no %s (it never evaluated): taking its latest checkpoint", workdir, best.BEST_FILE)
    if recorded is not None or (choice.isdigit() and int(choice) in _best_steps(workdir)):
        step = recorded["step"] if recorded is not None else int(choice)
        store = checkpoint.BestParams(workdir)
        try:
            return step, store.restore_params(step)
        finally:
            store.close()
    checkpoints = checkpoint.RunCheckpoints(workdir)
    try:
        if not choice.isdigit():
            return checkpoints.latest_params()  # the newest intact one; damaged ones are named
        if int(choice) not in checkpoints.all_steps():
            kept = sorted(set(checkpoints.all_steps()) | set(_best_steps(workdir)))
            raise FileNotFoundError(f"{workdir} holds no checkpoint of step {choice}; it holds steps {kept}")
        return int(choice), checkpoints.restore_params(int(choice))
    finally:
        checkpoints.close()


def _best_steps(workdir: str) -> list[int]:
    if not os.path.isdir(os.path.join(workdir, checkpoint.BEST_DIR)):
        return []
    store = checkpoint.BestParams(workdir)
    try:
        return store.all_steps()
    finally:
        store.close()


def run_model(workdir: str, dtype: jnp.dtype = jnp.float32, choice: str = "best") -> tuple[ContextBLIP, int] | None:
    """The model of the training run in `workdir` at the chosen checkpoint (`run_params`) and its step; None if
    it has none."""
    found = run_params(workdir, choice)
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
    choice = config.get("init_checkpoint", "best")
    previous = run_model(config.init, dtype, choice) if os.path.isdir(config.init) else None
    if previous is not None:
        taken = choice if choice != "best" or best.read(config.init) else f"latest: it has no {best.BEST_FILE}"
        return previous[0], f"step {previous[1]} of {config.init} ({taken})"
    if (
        os.path.isdir(config.init)
        and not directory.is_converted(config.init)
        and not os.path.exists(os.path.join(config.init, "config.json"))
    ):
        raise FileNotFoundError(f"init {config.init} holds neither a run checkpoint nor convertible weights")
    image_size = config.model.blip.vision.image_size
    model = load_contextblip(config.init, dtype=dtype, image_size=image_size, seed=config.seed, init=config.model.init)
    return model, config.init


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
