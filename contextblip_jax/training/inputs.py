"""What a run reads, from its config: the training input of its stage and the generated data of the main job.

    train = train_input(config, stage)      # generates the main job's data first if the config asks for it
    iterator = iter(train.dataset)          # batches with exactly `stage.batch_fields`; checkpointable
    train.examples_per_epoch                # from whichever source the config names (folder or TFDS records)

Evaluation sources are read once per run by `evaluation/evaluators.py`, through `runconfig.data_config`.

Imports: its own package (`training`), `data`, `runconfig`, `stages`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from contextblip_jax import runconfig
from contextblip_jax.data import grouped, imagecode, synthetic
from contextblip_jax.data.errors import SKIPPED_FIELD
from contextblip_jax.data.pipeline import (
    caption_source,
    captions_dataset,
    grouped_train_dataset,
    imagecode_dataset,
    imagecode_source,
)
from contextblip_jax.stages import SET_INDEX, Stage

SYNTHETIC_CAPTIONS = "captions.json"
"""Stage 1's caption file, written beside the generated sets: each training target with its description."""


@dataclasses.dataclass
class TrainInput:
    """The training batches of a stage (grain, resumable: save `iter(dataset)` with the train state) and the
    size of one epoch in examples, for per-epoch schedules."""

    dataset: grain.IterDataset
    examples_per_epoch: int


def train_input(config: ml_collections.ConfigDict, stage: Stage, batch_shards: int = 1) -> TrainInput:
    """The stage's training data (ImageCoDe descriptions or stage 1's captions), generating it first when
    `data.synthetic` asks. With `data.group_by_set` ImageCoDe batches hold whole sets (`set_sampler.py`) in one
    group per data shard (`batch_shards`) and micro-batch (`grad_accum_steps`), and carry their `set_index`."""
    ensure_synthetic_data(config)
    data = runconfig.data_config(config, train=True)
    if stage.data == "captions":
        if not data.annotations and config.data.synthetic:
            data = dataclasses.replace(data, annotations=(os.path.join(data.root, SYNTHETIC_CAPTIONS),))
        source = caption_source(data)
        dataset = captions_dataset(data, train=True, source=source)
        fields = stage.batch_fields
    elif data.group_by_set:
        source = imagecode_source(data, "train")
        groups = batch_shards * config.grad_accum_steps
        layout = grouped.Layout.of(data.batch_size, groups, data.set_slots, section="data")
        dataset = grouped_train_dataset(data, source, layout)
        fields = (*stage.batch_fields, SET_INDEX)
    else:
        source = imagecode_source(data, "train")
        dataset = imagecode_dataset(data, "train", train=True, source=source)
        fields = stage.batch_fields
    return TrainInput(dataset.map(_Select(fields)), len(source))


@dataclasses.dataclass(frozen=True)
class _Select(grain.transforms.Map):
    """Keeps the batch entries the model consumes, and the skip count the trainer takes off before the step (a
    picklable transform, for grain's worker processes)."""

    fields: tuple[str, ...]

    def map(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {name: np.asarray(batch[name]) for name in (*self.fields, SKIPPED_FIELD)}


def ensure_synthetic_data(config: ml_collections.ConfigDict) -> None:
    """Generates the ImageCoDe-layout data of the CPU main job when `data.synthetic` asks and the folder does not
    already hold exactly that data (`synthetic.ensure` checks its manifest), plus a BLIP-format caption file of its
    training targets for stage 1. Process 0 writes; the others wait."""
    root = config.data.root
    if not config.data.synthetic:
        return
    if jax.process_index() == 0:
        sets = config.data.synthetic
        generated = synthetic.ensure(
            root,
            seed=config.data.synthetic_seed,
            num_train_sets=sets,
            num_valid_sets=max(sets // 5, 1),
            num_test_sets=max(sets // 5, 1),
            kinds=config.data.synthetic_kinds,
        )
        if generated or not os.path.exists(os.path.join(root, SYNTHETIC_CAPTIONS)):
            captions = [
                {"image": os.path.relpath(example.image_paths[example.target], root), "caption": example.description}
                for example in imagecode.read_split(root, "train")
            ]
            with open(os.path.join(root, SYNTHETIC_CAPTIONS), "w") as f:
                json.dump(captions, f, indent=1)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("synthetic data")
