"""Where a run's weights come from: random initialisation, a converted or PyTorch checkpoint (`config.init`), or
a training run's best or latest checkpoint (`best.py`); and the architecture file that ties a workdir's
checkpoints to a model.

Models are built on a mesh, each parameter straight into the shards its logical axes give it
(`parallel.init_sharded`): no device or host holds a whole parameter of which it needs only a shard, except
where a PyTorch file is converted (below). Per source:
- random initialisation: drawn inside `jax.jit` with the shardings as outputs (within an ulp of an eager
  build, see `parallel.init_sharded`);
- a converted folder, or a previous run's best or latest checkpoint: read by Orbax into their shards, each
  process reading only its devices' slices (`storage.Shardings`); the parts a BLIP folder lacks are drawn
  as above;
- a PyTorch checkpoint (`.pth`, safetensors, a Hugging Face folder): converted whole on each host first, since
  conversion reads the file's tensors, then split onto the devices; convert it once
  (`python -m contextblip_jax.convert`) for a model too large for one host.
Without a mesh, a model is built on this process's first device (prediction, tests).

Imports: its own package (`checkpoints`), `convert`, `files`, `models`, `parallel`, `runconfig`, `storage`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from contextblip_jax import files, parallel, runconfig, storage
from contextblip_jax.checkpoints import best, run_state
from contextblip_jax.convert import directory, read_contextblip
from contextblip_jax.models import axes
from contextblip_jax.models.config import ContextBLIPConfig, flatten_dict
from contextblip_jax.models.contextblip import ContextBLIP

MODEL_CONFIG_FILE = directory.CONFIG_FILE
"""A workdir's architecture, written before its first checkpoint (named as in a converted folder)."""


def run_params(
    workdir: str, choice: str = "best", mesh: Mesh | None = None, rules: axes.Rules = axes.DEFAULT_RULES
) -> tuple[ContextBLIPConfig, dict[str, Any], int] | None:
    """The architecture, parameters and step of the training run in `workdir`; None if it has no checkpoint.

    `choice`: `best` (the model `W/best.json` names; the latest when the run never evaluated, e.g. stage 1),
    `latest` (the newest intact checkpoint; damaged newer ones are named in a warning,
    `storage.DamagedCheckpointError` when none reads back) or a step number. With `mesh`, every parameter is
    read straight into its shards under `rules`; without, whole to the host as numpy arrays."""
    runconfig.check_choice(choice)
    path = files.join(workdir, MODEL_CONFIG_FILE)
    if not files.exists(path):
        return None

    def config() -> ContextBLIPConfig:  # read once a checkpoint is found: a converted folder has a file of that name
        return ContextBLIPConfig.from_json(files.read_text(path))

    found = _chosen_params(workdir, choice, lambda: None if mesh is None else _shardings(config(), mesh, rules))
    if found is None:
        return None
    step, params = found
    return config(), params, step


def _shardings(config: ContextBLIPConfig, mesh: Mesh, rules: axes.Rules) -> dict[str, jax.sharding.Sharding]:
    """Each parameter's sharding by dotted name, from the model's shapes alone."""
    return parallel.flat_param_shardings(nnx.eval_shape(lambda: ContextBLIP(config, rngs=nnx.Rngs(0))), mesh, rules)


def _chosen_params(
    workdir: str, choice: str, shardings: Callable[[], storage.Shardings | None]
) -> tuple[int, dict[str, Any]] | None:
    recorded = best.read(workdir) if choice == "best" else None
    if choice == "best" and recorded is None:
        logging.info("%s has no %s (it never evaluated): taking its latest checkpoint", workdir, best.BEST_FILE)
    if recorded is not None or (choice.isdigit() and int(choice) in _best_steps(workdir)):
        step = recorded["step"] if recorded is not None else int(choice)
        store = best.BestParams(workdir)
        try:
            return step, store.restore_params(step, shardings())
        finally:
            store.close()
    checkpoints = run_state.RunCheckpoints(workdir)
    try:
        if not choice.isdigit():  # the newest intact one; damaged ones are named
            return checkpoints.latest_params(shardings()) if checkpoints.all_steps() else None
        if int(choice) not in checkpoints.all_steps():
            kept = sorted(set(checkpoints.all_steps()) | set(_best_steps(workdir)))
            raise FileNotFoundError(f"{workdir} holds no checkpoint of step {choice}; it holds steps {kept}")
        return int(choice), checkpoints.restore_params(int(choice), shardings())
    finally:
        checkpoints.close()


def _best_steps(workdir: str) -> list[int]:
    if not files.is_dir(files.join(workdir, best.BEST_DIR)):
        return []
    store = best.BestParams(workdir)
    try:
        return store.all_steps()
    finally:
        store.close()


def run_model(
    workdir: str,
    dtype: jnp.dtype = jnp.float32,
    choice: str = "best",
    mesh: Mesh | None = None,
    rules: axes.Rules = axes.DEFAULT_RULES,
) -> tuple[ContextBLIP, int] | None:
    """The model of the training run in `workdir` at the chosen checkpoint (`run_params`), each parameter read
    straight into its shards of `mesh` (default: this process's first device), and its step; None if it has
    none."""
    mesh = _one_device() if mesh is None else mesh
    found = run_params(workdir, choice, mesh, rules)
    if found is None:
        return None
    config, params, step = found
    return _sharded(config, params, dtype, mesh, rules), step


def initial_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> tuple[ContextBLIP, str]:
    """The model a run starts from, in its shards of `mesh` (default: this process's first device) under the
    config's logical-axis rules, and where it came from (random, a checkpoint, or a previous stage)."""
    dtype = jnp.dtype(config.dtype)
    mesh = _one_device() if mesh is None else mesh
    rules = axes.logical_rules(config.logical_rules)
    if not config.init:
        model = _sharded(runconfig.model_config(config), {}, dtype, mesh, rules, seed=config.seed)
        return model, "random initialisation"
    if not files.exists(config.init):
        raise FileNotFoundError(f"init {config.init} does not exist")
    choice = config.init_checkpoint
    previous = run_model(config.init, dtype, choice, mesh, rules) if files.is_dir(config.init) else None
    if previous is not None:
        taken = choice if choice != "best" or best.read(config.init) else f"latest: it has no {best.BEST_FILE}"
        return previous[0], f"step {previous[1]} of {config.init} ({taken})"
    if (
        files.is_dir(config.init)
        and not directory.is_converted(config.init)
        and not files.exists(files.join(config.init, "config.json"))
    ):
        raise FileNotFoundError(f"init {config.init} holds neither a run checkpoint nor convertible weights")
    if files.is_url(config.init) and not directory.is_converted(config.init):
        raise ValueError(
            f"init {config.init}: PyTorch checkpoints are read from local paths only; convert it "
            "(python -m contextblip_jax.convert) and give the converted folder, which may lie on gs://"
        )
    model_config, params = read_contextblip(
        config.init,
        image_size=config.model.blip.vision.image_size,
        shardings=lambda model_config: _shardings(model_config, mesh, rules),
    )
    model = _sharded(model_config, params, dtype, mesh, rules, seed=config.seed, init=config.model.init)
    return model, config.init


def _sharded(
    config: ContextBLIPConfig,
    params: dict[str, Any],
    dtype: jnp.dtype,
    mesh: Mesh,
    rules: axes.Rules,
    seed: int = 0,
    init: str | None = None,
) -> ContextBLIP:
    """A ContextBLIP holding `params` in their shards; parameters not given are drawn from `seed` in theirs, as
    `init` says (`ContextBLIPConfig.init`; None: as `config` says), which the model's config records."""
    if init is not None:
        config = dataclasses.replace(config, init=init)
    return parallel.init_sharded(lambda: ContextBLIP(config, dtype=dtype, rngs=nnx.Rngs(seed)), mesh, rules, params)


def _one_device() -> Mesh:
    return parallel.make_mesh((1, 1, 1), jax.local_devices()[:1])


def check_resume(workdir: str, config: ContextBLIPConfig) -> None:
    """A workdir's checkpoints only fit the architecture they were saved with: a different one is an error
    naming every differing field, raised before anything is compiled or restored."""
    path = files.join(workdir, MODEL_CONFIG_FILE)
    if not files.exists(path) or not files.is_dir(files.join(workdir, "checkpoints")):
        return
    saved = flatten_dict(json.loads(files.read_text(path)))
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
        files.makedirs(workdir)
        files.write_text(files.join(workdir, MODEL_CONFIG_FILE), model.config.to_json())
