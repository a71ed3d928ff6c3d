"""The pieces `train.py`, `evaluate.py` and `predict.py` share: where a run's weights come from, the data
config, and scoring a split. Each function does one step of the trainer's outline, so that file reads top
to bottom."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from contextblip_jax import checkpoint, parallel
from contextblip_jax.convert import directory, load_contextblip
from contextblip_jax.data import imagecode, synthetic
from contextblip_jax.data.pipeline import DataConfig, captions_dataset, imagecode_dataset, imagecode_source
from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.contextblip import REMAT_TOWERS, TRAINABLE, ContextBLIP, dotted_path, set_remat
from contextblip_jax.step import ModelSpec, make_predict_step, split_model
from contextblip_jax.trainconfig import STAGES

MODEL_CONFIG_FILE = "model_config.json"


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors a user can fix, raised before anything is compiled."""
    if config.stage not in STAGES:
        raise ValueError(f"unknown stage {config.stage!r}; expected one of {STAGES}")
    unknown = sorted(set(config.remat) - set(REMAT_TOWERS))
    if unknown:
        raise ValueError(f"remat towers {unknown} unknown; choose from {REMAT_TOWERS}")
    if config.data.root and not config.data.synthetic and not os.path.isdir(config.data.root):
        raise FileNotFoundError(f"data root {config.data.root} does not exist")
    if config.grad_accum_steps < 1 or config.data.batch_size % config.grad_accum_steps:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} is not divisible by grad_accum_steps {config.grad_accum_steps}"
        )


def data_config(config: ml_collections.ConfigDict, train: bool) -> DataConfig:
    values = config.data.to_dict()
    values.pop("synthetic")
    if not train:
        values.update(batch_size=config.eval.batch_size, augment={})
    return DataConfig.from_config(values)


SYNTHETIC_CAPTIONS = "captions.json"


def ensure_synthetic_data(config: ml_collections.ConfigDict) -> None:
    """Generates the ImageCoDe-layout data of the CPU main job when `data.synthetic` asks and it is absent,
    plus a BLIP-format caption file of its training targets (`captions.json`) for stage 1."""
    root = config.data.root
    if not config.data.synthetic or os.path.exists(os.path.join(root, SYNTHETIC_CAPTIONS)):
        return
    if jax.process_index() == 0:
        if not os.path.exists(imagecode.split_path(root, "train")):
            sets = config.data.synthetic
            counts = synthetic.generate(
                root,
                seed=config.data.seed,
                num_train_sets=sets,
                num_valid_sets=max(sets // 5, 1),
                num_test_sets=max(sets // 5, 1),
            )
            logging.info("generated synthetic ImageCoDe data in %s: %s", root, counts)
        captions = [
            {"image": os.path.relpath(example.image_paths[example.target], root), "caption": example.description}
            for example in imagecode.read_split(root, "train")
        ]
        write_json(os.path.join(root, SYNTHETIC_CAPTIONS), captions)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data")


def train_dataset(config: ml_collections.ConfigDict):
    data = data_config(config, train=True)
    if config.stage == "pretrain":
        if not data.annotations and config.data.synthetic:
            data = dataclasses.replace(data, annotations=(os.path.join(data.root, SYNTHETIC_CAPTIONS),))
        return captions_dataset(data, train=True)
    return imagecode_dataset(data, "train", train=True)


def model_config(config: ml_collections.ConfigDict) -> ContextBLIPConfig:
    return ContextBLIPConfig.from_dict(config.model.to_dict())


def previous_run(workdir: str) -> tuple[ContextBLIPConfig, dict[str, np.ndarray], int] | None:
    """The architecture, latest parameters and their step of a training run in `workdir`, if it has a
    checkpoint."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    manager = checkpoint.RunCheckpoints(workdir, keep=1_000_000)
    step = manager.latest_step()
    if step is None:
        manager.close()
        return None
    with open(path) as f:
        config = ContextBLIPConfig.from_json(f.read())
    state = manager.manager.restore(step, args=_state_only(manager.manager.item_metadata(step)["state"]))["state"]
    manager.close()
    params = {**state["trainable"], **state["frozen"]}
    return config, {name: np.asarray(value) for name, value in params.items()}, step


def _state_only(metadata: Any):
    """Restore arguments for the train state alone, onto this host's first device, whatever mesh wrote it."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) if hasattr(m, "shape") else m, metadata
    )
    return ocp.args.Composite(state=ocp.args.StandardRestore(target))


def initial_model(config: ml_collections.ConfigDict) -> tuple[ContextBLIP, str]:
    """The model a run starts from, and where it came from (random, a checkpoint, or a previous stage)."""
    dtype = jnp.dtype(config.dtype)
    if not config.init:
        return ContextBLIP(model_config(config), dtype=dtype, rngs=nnx.Rngs(config.seed)), "random initialisation"
    if not os.path.exists(config.init):
        raise FileNotFoundError(f"init {config.init} does not exist")
    previous = previous_run(config.init) if os.path.isdir(config.init) else None
    if previous is not None:
        architecture, params, _ = previous
        from contextblip_jax.convert.contextblip import build_contextblip

        return build_contextblip(architecture, params, dtype), f"the latest checkpoint of {config.init}"
    if (
        os.path.isdir(config.init)
        and not directory.is_converted(config.init)
        and not os.path.exists(os.path.join(config.init, "config.json"))
    ):
        raise FileNotFoundError(f"init {config.init} holds neither a run checkpoint nor convertible weights")
    image_size = config.model.blip.vision.image_size
    return load_contextblip(config.init, dtype=dtype, image_size=image_size, seed=config.seed), config.init


def apply_remat(model: ContextBLIP, config: ml_collections.ConfigDict) -> ContextBLIP:
    set_remat(model, tuple(config.remat))
    return model


def trainable_pattern(config: ml_collections.ConfigDict) -> str:
    return config.trainable or TRAINABLE[config.stage]


def check_resume(workdir: str, config: ContextBLIPConfig) -> None:
    """A workdir's checkpoints only fit the architecture they were saved with: a different one is an error
    naming every differing field, raised before anything is compiled or restored."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    with open(path) as f:
        saved = _flatten(json.load(f))
    given = _flatten(json.loads(config.to_json()))
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, config {given.get(key)!r}"
        for key in sorted(set(saved) | set(given))
        if saved.get(key) != given.get(key)
    ]
    if differences:
        raise ValueError(f"{workdir} holds checkpoints of another architecture: " + "; ".join(differences))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_model_config(workdir: str, model: ContextBLIP) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
            f.write(model.config.to_json())


@dataclasses.dataclass
class Setup:
    """A model ready to score: for evaluation and prediction outside the training loop."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    spec: ModelSpec
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    step: int
    predict: Any


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """The run's latest checkpoint (or `config.init` when it has none, e.g. zero-shot), sharded on the mesh."""
    check_config(config)
    mesh = parallel.make_mesh(config.mesh)
    previous = previous_run(workdir)
    step = 0
    if previous is not None:
        from contextblip_jax.convert.contextblip import build_contextblip

        architecture, params, step = previous
        model = build_contextblip(architecture, params, jnp.dtype(config.dtype))
    else:
        model, origin = initial_model(config)
        logging.info("no checkpoint in %s; scoring %s", workdir, origin)
    spec, trainable, frozen = split_model(model, trainable_pattern(config))
    flat = flat_shardings(model, mesh, config.logical_rules)
    trainable = {k: jax.device_put(v, flat[k]) for k, v in trainable.items()}
    frozen = {k: jax.device_put(v, flat[k]) for k, v in frozen.items()}
    predict_fn = jax.jit(make_predict_step(spec, config.stage))
    return Setup(config, mesh, spec, trainable, frozen, step, lambda batch: predict_fn(trainable, frozen, batch))


def flat_shardings(model: ContextBLIP, mesh: jax.sharding.Mesh, rules: Any) -> dict[str, jax.sharding.NamedSharding]:
    """Each parameter's sharding under the logical-axis rules, by dotted path."""
    tree = parallel.param_shardings(nnx.state(model, nnx.Param), mesh, parallel.logical_rules(rules))
    return {dotted_path(path): getattr(value, "value", value) for path, value in nnx.to_flat_state(tree)}


def score(setup: Setup, split: str):
    """(scored predictions, source) for an ImageCoDe split; see `evaluate.score_split`."""
    from contextblip_jax.scoring import score_split

    data = data_config(setup.config, train=False)
    source = imagecode_source(data, split)
    batches = imagecode_dataset(data, split, train=False, source=source)
    sharding = parallel.batch_sharding(setup.mesh)
    return score_split(setup.predict, batches, sharding), source


def write_json(path: str, value: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(value, f, indent=1)


def score_mmvp(setup: Setup, root: str) -> dict[str, float]:
    """MMVP-VLM pair accuracy of the setup's model (see `scoring.score_mmvp`)."""
    from contextblip_jax.data import mmvp
    from contextblip_jax.data.preprocess import BlipTokenizer, load_image
    from contextblip_jax.scoring import score_mmvp as score

    data = data_config(setup.config, train=False)
    tokenizer = BlipTokenizer(data.vocab)
    return score(
        setup.predict,
        mmvp.read_pairs(root),
        lambda texts: tokenizer(texts, data.max_text_length, data.first_token),
        lambda path: load_image(path, data.image_size),
    )
