"""Every check of a run config's values, in one pass before anything is built, compiled or read.

A bad value found after the model is built costs a user the minutes of building it, and one found at the first
evaluation (a misspelt `best.metric`) the whole run up to it. So each check that a value's consumer would
make later is made here, with the consumer's own message where the consumer owns the rule (the model's runtime
switches, the optimizers, the data pipeline's fields, the mesh axes).

Imports: its own package (`runconfig`), `data`, `evaluation.scoring`, `files`, `models`, `parallel`, `stages`,
`training.optim`, `training.programs`.
"""

from __future__ import annotations

import os
import re

import ml_collections

from contextblip_jax import files, parallel, stages
from contextblip_jax.data import imagecode
from contextblip_jax.data.pipeline import DataConfig
from contextblip_jax.evaluation.scoring import METRICS
from contextblip_jax.models import axes
from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.contextblip import check_runtime
from contextblip_jax.models.tmim import TEXT_TOKENS
from contextblip_jax.runconfig.protocol import PROTOCOLS
from contextblip_jax.training.optim import OPTIMIZERS
from contextblip_jax.training.programs import NEGATIVES

DTYPES = ("float32", "bfloat16", "float16")
BEST_MODES = ("max", "min")
CHECKPOINT_CHOICES = ("best", "latest")
"""Which checkpoint of a workdir a reader takes: `best`, `latest`, or a step number given as digits."""
RUN_ONLY_KEYS = ("synthetic", "synthetic_seed", "synthetic_kinds")
"""`config.data` keys that are not `DataConfig` fields: they steer the run (data generation), not the pipeline."""


def check_choice(choice: str) -> str:
    """`best`, `latest` or a step number; anything else is an error naming the choices."""
    if choice not in CHECKPOINT_CHOICES and not choice.isdigit():
        raise ValueError(f"checkpoint choice {choice!r} is not one of {CHECKPOINT_CHOICES} or a step number")
    return choice


def data_config(config: ml_collections.ConfigDict, train: bool) -> DataConfig:
    """The pipeline's settings: training ones, or evaluation ones (the eval batch size, no augmentation)."""
    values = {k: v for k, v in config.data.to_dict().items() if k not in RUN_ONLY_KEYS}
    if not train:
        values.update(batch_size=config.eval.batch_size, augment={})
    return DataConfig.from_config(values)


def validate(config: ml_collections.ConfigDict, data: bool = True, weights: bool = True) -> stages.Stage:
    """Raises `ValueError` (or `FileNotFoundError` for a path) naming the key and its allowed values; returns the
    run's stage. `data`: the ImageCoDe folder a stage reads must hold its files; `weights`: `init` must exist
    (`--compile_only` reads neither; MMVP-VLM scoring reads no ImageCoDe folder)."""
    stage = stages.get(config.stage)
    if config.protocol and config.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {config.protocol!r}; expected one of {sorted(PROTOCOLS)}")
    _check_schedule(config)
    _check_compute(config)
    _check_training(config)
    ContextBLIPConfig.from_dict(config.model.to_dict()).validate()
    data_config(config, train=True)
    data_config(config, train=False)
    _check_paths(config, stage, data, weights)
    return stage


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    if config.total_steps < 0 or config.epochs < 0 or not (config.total_steps or config.epochs):
        raise ValueError(
            f"total_steps {config.total_steps} and epochs {config.epochs}: set total_steps > 0, or "
            "total_steps=0 and epochs > 0"
        )
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"{key} {config[key]} must be at least 1")
    if config.eval_every < 0:
        raise ValueError(f"eval_every {config.eval_every} must be 0 (only at the end) or positive")
    if config.best.mode not in BEST_MODES:
        raise ValueError(f"best.mode must be one of {BEST_MODES}, got {config.best.mode!r}")
    if config.best.metric not in METRICS:
        raise ValueError(f"best.metric {config.best.metric!r} is not in the evaluation rows; choose from {METRICS}")
    if config.eval.splits and config.best.split not in config.eval.splits:
        raise ValueError(f"best.split {config.best.split!r} is not evaluated; eval.splits is {config.eval.splits}")
    unknown = sorted(set(config.eval.splits) - set(imagecode.SPLIT_FILES))
    if unknown:
        raise ValueError(f"eval.splits {unknown} unknown; choose from {tuple(imagecode.SPLIT_FILES)}")
    if config.context.cache_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"context.cache_dtype {config.context.cache_dtype!r} unknown; choose float32 or bfloat16")
    if config.eval.set_slots < 0:
        raise ValueError(f"eval.set_slots {config.eval.set_slots} must be 0 (automatic) or positive")
    if config.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size {config.eval.batch_size} must be at least 1")
    check_choice(str(config.init_checkpoint))


def _check_compute(config: ml_collections.ConfigDict) -> None:
    parallel.resolve_mesh_shape(config.mesh, _devices_for(config.mesh))
    axes.logical_rules(config.logical_rules)
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype {config.dtype!r} unknown; choose from {DTYPES}")
    check_runtime(
        tuple(config.remat),
        config.remat_policy,
        config.attention,
        config.dtype,
        config.dropout.text,
        config.dropout.tmim,
    )
    if config.grad_accum_steps < 1 or config.data.batch_size % config.grad_accum_steps:
        raise ValueError(
            f"data.batch_size {config.data.batch_size} is not divisible by grad_accum_steps {config.grad_accum_steps}"
        )


def _devices_for(shape: tuple[int, ...]) -> int:
    """A device count the mesh shape's fixed sizes divide: the shape's own form is checked here, its fit to the
    devices when the mesh is made."""
    fixed = 1
    for size in shape:
        fixed *= size if isinstance(size, int) and size > 0 else 1
    return fixed


def _check_training(config: ml_collections.ConfigDict) -> None:
    if config.optimizer.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.optimizer.name!r}")
    for key in ("trainable", "optimizer.head_pattern"):
        pattern = config.trainable if key == "trainable" else config.optimizer.head_pattern
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{key} {pattern!r} is not a regular expression: {error}") from None
    if config.loss.negatives not in NEGATIVES:
        raise ValueError(f"loss.negatives {config.loss.negatives!r} unknown; choose from {NEGATIVES}")
    if config.loss.tmim_token not in TEXT_TOKENS:
        raise ValueError(f"TMIM text token {config.loss.tmim_token!r} unknown; choose from {TEXT_TOKENS}")
    optimizer, loss = config.optimizer, config.loss
    for key in (
        "lr",
        "head_lr",
        "weight_decay",
        "warmup_init",
        "min_lr",
        "clip_norm",
        "warmup_steps",
        "steps_per_epoch",
    ):
        if optimizer[key] < 0:
            raise ValueError(f"optimizer.{key} {optimizer[key]} must not be negative")
    for key in ("b1", "b2"):
        if not 0 <= optimizer[key] < 1:
            raise ValueError(f"optimizer.{key} {optimizer[key]} must lie in [0, 1)")
    if optimizer.eps <= 0 or optimizer.decay_per_epoch <= 0:
        raise ValueError(
            f"optimizer.eps {optimizer.eps} and decay_per_epoch {optimizer.decay_per_epoch} must be positive"
        )
    for key in ("itm", "tmim", "mask_prediction", "temperature"):
        if loss[key] < 0:
            raise ValueError(f"loss.{key} {loss[key]} must not be negative (0: off)")
    if config.data.synthetic < 0:
        raise ValueError(f"data.synthetic {config.data.synthetic} must be 0 (a folder) or the sets to generate")
    if config.data.synthetic_kinds:
        from contextblip_jax.data import synthetic

        synthetic.parse_kinds(config.data.synthetic_kinds)


def _check_paths(config: ml_collections.ConfigDict, stage: stages.Stage, data: bool, weights: bool) -> None:
    if config.data.root and not config.data.synthetic and not os.path.isdir(config.data.root):
        raise FileNotFoundError(f"data root {config.data.root} does not exist")
    if weights and config.init and not files.exists(config.init):
        raise FileNotFoundError(f"init {config.init} does not exist")
    if data:
        check_imagecode_folder(config, stage)


def check_imagecode_folder(config: ml_collections.ConfigDict, stage: stages.Stage) -> None:
    """A run that reads ImageCoDe from a folder finds its files, or learns exactly what to get and where to put
    it (a bare `file not found` tells a new user nothing)."""
    if stage.data != "imagecode" or config.data.source != "folder" or config.data.synthetic:
        return
    missing = [
        name
        for name in (*imagecode.SPLIT_FILES.values(), imagecode.IMAGE_DIR)
        if not os.path.exists(os.path.join(config.data.root, name))
    ]
    if missing:
        where = f"{config.data.root} lacks {', '.join(missing)}" if config.data.root else "data.root is not set"
        raise FileNotFoundError(
            f"{where}. The {stage.name} stage reads ImageCoDe: get train_data.json, valid_data.json, "
            "test_data_unlabeled.json and image-sets.zip (about 13.8 GB) from Zenodo record 6518944 or the "
            "Hugging Face dataset BennoKrojer/ImageCoDe, unpack image-sets.zip beside the JSON files "
            "(FOLDER/image-sets/SET/imgX.jpg), check the folder with `python -m contextblip_jax.data.doctor "
            "--root=FOLDER`, then pass --config.data.root=FOLDER (or try configs/synthetic.py, which "
            "generates its own data)"
        )
