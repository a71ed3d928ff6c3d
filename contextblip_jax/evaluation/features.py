"""Stage 2b on cached features: its towers are frozen, so each training description's 10 ITM vectors are computed
once per run and kept in the workdir, instead of again for every description in every epoch.

    if features.wanted(config, stage):
        train_input = features.train_input(config, built, state, mesh, workdir)   # built, or read back

The cache is one grouped pass of the frozen model over the training split (`ImageCodeEvaluator`: each set's
images once, no augmentation, no dropout), in example order, stored as `W/features/train/` (`features.npy`
[N, 10, D] in `context.cache_dtype`, `target.npy`, `is_video.npy`, `example_id.npy`) beside `W/features/train.json`
(its key, shape, dtype, build seconds). The key is a SHA-256 over everything the vectors depend on: the values of
the parameters they read (the 2a weights the run starts from), the split's annotation file and the names and sizes
of its images, and the settings that shape the inputs (image size, text length and cleaning, first token,
vocabulary, compute dtype, the model config). A resumed run whose key matches reads the files back; any other key
rebuilds them. At ImageCoDe's 16,594 training descriptions and D = 768 the features take 510 MB in float32, 255 MB
in bfloat16.

Imports: its own package (`evaluation`), `data`, `files`, `runconfig`, `stages`, `training.inputs`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from contextblip_jax import files, runconfig
from contextblip_jax.data import imagecode
from contextblip_jax.data.pipeline import array_dataset
from contextblip_jax.evaluation.evaluators import ImageCodeEvaluator
from contextblip_jax.stages import FEATURES, Stage
from contextblip_jax.training.inputs import TrainInput

CACHE_DIR = "features"
DTYPES = ("float32", "bfloat16")
READS_NOTHING_OF = re.compile(r"^(context|head)\.")
"""Parameters the cached vectors do not depend on: a 2b run may train these and still read its cache."""
INPUT_SETTINGS = ("image_size", "max_text_length", "first_token", "vocab", "pre_caption_words", "pre_caption_rules")
COLUMNS = ("features", "target", "is_video", "example_id")


def wanted(config: ml_collections.ConfigDict, stage: Stage) -> bool:
    """Whether this run trains on cached features: a stage that can (`Stage.features`) and `context.cache_features`."""
    return stage.features and bool(config.context.cache_features)


def cache_key(config: ml_collections.ConfigDict, params: Mapping[str, Any], split: str) -> str:
    """The SHA-256 of what the split's vectors depend on (the module docstring); `params` are the frozen ones."""
    digest = hashlib.sha256()
    settings = {name: config.data[name] for name in INPUT_SETTINGS}
    settings.update(dtype=config.dtype, model=config.model.to_dict(), split=split)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(params):
        if READS_NOTHING_OF.search(name):
            continue
        value = _host_array(params[name])
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    _add_data(digest, runconfig.data_config(config, train=False), split)
    return digest.hexdigest()


def _host_array(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def _add_data(digest: Any, data: Any, split: str) -> None:
    """The split's annotations and its images' names and sizes (folder), or its record files' (TFDS)."""
    if data.source == "folder":
        with open(os.path.join(data.root, imagecode.SPLIT_FILES[split]), "rb") as f:
            digest.update(f.read())
        for example in imagecode.read_split(data.root, split):
            for path in example.image_paths:
                digest.update(f"{os.path.relpath(path, data.root)}:{os.path.getsize(path)}".encode())
        return
    for name in sorted(os.listdir(data.tfds_dir)):
        path = os.path.join(data.tfds_dir, name)
        if os.path.isfile(path):
            digest.update(f"{name}:{os.path.getsize(path)}".encode())


def train_input(
    config: ml_collections.ConfigDict, built: Any, state: Any, mesh: jax.sharding.Mesh, workdir: str
) -> TrainInput:
    """The training split's cached vectors as shuffled, repeated batches of `stages.FEATURE_FIELDS`."""
    trained = [name for name in built.trainable if not READS_NOTHING_OF.search(name)]
    if trained:
        raise ValueError(
            f"context.cache_features needs the towers frozen, but the run trains {trained[:3]}...: set "
            "context.cache_features=False or a `trainable` pattern within context. and head."
        )
    arrays = cached(config, "train", built, state, mesh, workdir)
    rows = {name: arrays[name] for name in (FEATURES, "target", "is_video")}
    data = runconfig.data_config(config, train=True)
    return TrainInput(array_dataset(rows, data), len(arrays["target"]))


def cached(
    config: ml_collections.ConfigDict, split: str, built: Any, state: Any, mesh: jax.sharding.Mesh, workdir: str
) -> dict[str, np.ndarray]:
    """The split's columns (`COLUMNS`), read from `W/features/` when their key matches, else computed and written
    (by process 0; every process computes them, as every process scores an evaluation)."""
    key = cache_key(config, state.frozen, split)
    folder, meta_path = files.join(workdir, CACHE_DIR, split), files.join(workdir, CACHE_DIR, f"{split}.json")
    if files.exists(meta_path):
        meta = json.loads(files.read_text(meta_path))
        if meta.get("key") == key and all(files.exists(files.join(folder, f"{c}.npy")) for c in COLUMNS):
            logging.info("stage 2b features: reusing %s (%s, built in %.0f s)", folder, meta["shape"], meta["seconds"])
            return _read(folder, meta["dtype"])
        logging.info("stage 2b features: %s was built from other weights, data or settings; rebuilding", folder)
    arrays, seconds = _build(config, split, built, state, mesh)
    if jax.process_index() == 0:
        meta = {"key": key, "seconds": round(seconds, 1), "dtype": config.context.cache_dtype}
        _write(folder, meta_path, arrays, meta)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("stage 2b features written")
    return arrays


def _build(
    config: ml_collections.ConfigDict, split: str, built: Any, state: Any, mesh: jax.sharding.Mesh
) -> tuple[dict[str, np.ndarray], float]:
    began = time.perf_counter()
    data = runconfig.data_config(config, train=False)
    evaluator = ImageCodeEvaluator(data, split, mesh, group_by_set=True, set_slots=config.eval.set_slots)
    logging.info(
        "stage 2b features: one pass of the frozen towers over %s (%d descriptions, %d images to encode)",
        split,
        len(evaluator.source),
        evaluator.images_encoded,
    )
    collected = evaluator.collect(lambda batch: built.features(state.trainable, state.frozen, batch))
    order = np.argsort(collected["example_id"], kind="stable")
    dtype = jnp.bfloat16 if config.context.cache_dtype == "bfloat16" else np.float32
    arrays = {
        "features": collected["output"][order].astype(dtype),
        "target": collected["target"][order].astype(np.int32),
        "is_video": collected["is_video"][order].astype(bool),
        "example_id": collected["example_id"][order].astype(np.int32),
    }
    seconds = time.perf_counter() - began
    size = arrays["features"].nbytes / 2**20
    logging.info("stage 2b features: %s %s (%.0f MB) in %.1f s", split, arrays["features"].shape, size, seconds)
    return arrays, seconds


def _write(folder: str, meta_path: str, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
    """The key goes first, each column is replaced whole (`files.write_bytes`), and the new key comes last: a run
    killed while writing leaves no key that names incomplete or older files."""
    files.remove(meta_path)
    files.makedirs(folder)
    for name, value in arrays.items():
        stored = io.BytesIO()
        np.save(stored, value.view(np.uint16) if value.dtype == jnp.bfloat16 else value)
        files.write_bytes(files.join(folder, f"{name}.npy"), stored.getvalue())
    files.write_text(meta_path, json.dumps({**meta, "shape": list(arrays["features"].shape)}))


def _read(folder: str, dtype: str) -> dict[str, np.ndarray]:
    """Local files are mapped, not read (510 MB of features at ImageCoDe's size); objects are downloaded whole."""
    paths = {name: files.join(folder, f"{name}.npy") for name in COLUMNS}
    if files.is_url(folder):
        arrays = {name: np.load(io.BytesIO(files.read_bytes(path))) for name, path in paths.items()}
    else:
        arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    if dtype == "bfloat16":
        arrays["features"] = arrays["features"].view(jnp.bfloat16)
    return arrays
