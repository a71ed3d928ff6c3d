"""Stage 2b on cached features: the cached vectors are the model's, a cached step is the image step, the key
follows weights, data and settings, and a run resumes on its cache exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contextblip_jax import parallel, runconfig, stages, train
from contextblip_jax.data import pipeline
from contextblip_jax.evaluation import features
from contextblip_jax.models.config import ContextConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training.step import split_model
from contextblip_jax.training.telemetry import read_metrics
from tests.runs import run_config
from tests.tiny import stage_batch, tiny_contextblip

TIMED = ("examples_per_s",)


def test_a_step_on_cached_features_is_the_step_on_images():
    """Loss and gradients of the 2b loss from `candidate_features` equal those from the images (dropout off)."""
    model = ContextBLIP(tiny_contextblip(context=ContextConfig(dropout=0.0)), rngs=nnx.Rngs(0))
    stage = stages.get("context")
    batch = stage_batch(stage, [3, 0, 9], [True, False, True], 10, length=8, padded_from=5)
    cached = {
        stages.FEATURES: model.candidate_features(batch["images"], batch["input_ids"], batch["attention_mask"]),
        "target": batch["target"],
        "is_video": batch["is_video"],
    }
    spec, trainable, frozen = split_model(model, stage.trainable_filter())

    def loss(params, inputs):
        return stage.loss(spec.merge(params, frozen), inputs, jax.random.key(0), base_config().loss)[0]

    step = jax.jit(jax.value_and_grad(loss))
    from_images, from_features = step(trainable, batch), step(trainable, cached)
    chex.assert_trees_all_close(from_features, from_images, atol=1e-6, rtol=1e-6)


def cache_config(data_root: str, **overrides):
    return run_config(data_root, stage="context", context__cache_features=True, **overrides)


@pytest.fixture(scope="module")
def context_run(data_root, tmp_path_factory):
    """(config, programs, step-0 state, mesh, workdir) of a cached stage-2b run, built as the trainer builds them
    (random weights, one device)."""
    config = cache_config(data_root)
    mesh = parallel.make_mesh((1, 1, 1))
    workdir = str(tmp_path_factory.mktemp("context"))
    built, state = train.initial_state(config, stages.get("context"), mesh, workdir, 1)
    return config, built, state, mesh, workdir


def test_the_cache_holds_each_descriptions_vectors_in_example_order(context_run):
    config, built, state, mesh, workdir = context_run
    arrays = features.cached(config, "train", built, state, mesh, workdir)
    data = dataclasses.replace(runconfig.data_config(config, train=False), batch_size=4)
    model = built.spec.merge(state.trainable, state.frozen)
    batch = next(iter(pipeline.imagecode_dataset(data, "train", train=False)))
    expected = model.candidate_features(
        jnp.asarray(batch["images"]), jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    )
    np.testing.assert_array_equal(arrays["example_id"][:4], batch["example_id"])
    chex.assert_trees_all_close(np.asarray(arrays["features"][:4]), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(arrays["target"][:4], batch["target"])
    assert len(arrays["target"]) == len(pipeline.imagecode_source(data, "train"))


def test_the_key_follows_the_weights_the_data_and_the_input_settings(data_root, tmp_path):
    config = cache_config(data_root)
    frozen = {
        "blip.vision.blocks.0.fc1.kernel": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4),
        "adapter.up.kernel": np.ones((4, 2), np.float32),
        "head.proj.bias": np.zeros(1, np.float32),
    }
    key = features.cache_key(config, frozen, "train")
    assert features.cache_key(config, {name: value.copy() for name, value in frozen.items()}, "train") == key
    nudged = frozen["blip.vision.blocks.0.fc1.kernel"].copy()
    nudged[1, 2] += 1e-6
    assert features.cache_key(config, {**frozen, "blip.vision.blocks.0.fc1.kernel": nudged}, "train") != key
    assert features.cache_key(config, {**frozen, "head.proj.bias": np.ones(1, np.float32)}, "train") == key
    longer = cache_config(data_root, data__max_text_length=config.data.max_text_length - 1)
    assert features.cache_key(longer, frozen, "train") != key
    assert features.cache_key(config, frozen, "valid") != key
    copy = str(tmp_path / "data")
    shutil.copytree(data_root, copy)
    assert features.cache_key(cache_config(copy), frozen, "train") == key
    split = os.path.join(copy, "train_data.json")
    with open(split) as f:
        annotations = json.load(f)
    first_set = next(iter(annotations))
    first_image = next(iter(annotations[first_set]))
    annotations[first_set][first_image] += " again"
    with open(split, "w") as f:
        json.dump(annotations, f)
    assert features.cache_key(cache_config(copy), frozen, "train") != key


def test_a_run_that_trains_the_towers_cannot_use_the_cache(data_root):
    config = cache_config(data_root, trainable=r"^(context|blip\.text)\.")
    built = types.SimpleNamespace(trainable={"context.layers.0.fc1.kernel": 0, "blip.text.layers.0.fc1.kernel": 0})
    with pytest.raises(ValueError, match="towers frozen"):
        features.train_input(config, built, None, None, "")


@pytest.mark.long
def test_a_cached_run_resumes_on_its_cache_exactly_and_rebuilds_for_other_weights(tmp_path, data_root, caplog):
    first = str(tmp_path / "2a")
    train.train(run_config(data_root, total_steps=2), first)
    config = cache_config(data_root, init=first, log_every=1, checkpoint_every=2)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    with caplog.at_level(logging.INFO):
        train.train(with_keys(config, total_steps=4), straight)
        train.train(with_keys(config, total_steps=2), resumed)
        caplog.clear()
        train.train(with_keys(config, total_steps=4), resumed)
    assert "stage 2b features: reusing" in caplog.text and "one pass of the frozen towers" not in caplog.text

    def rows(workdir):  # the interrupted run also evaluated where it first ended, at step 2
        kept = [r for r in read_metrics(workdir) if r["split"] == "train" or r["step"] == 4]
        return [{k: v for k, v in r.items() if k not in TIMED} for r in kept]

    assert [r["step"] for r in rows(straight)] == [1, 2, 3, 4, 4]
    assert rows(resumed) == rows(straight)
    other = str(tmp_path / "2a-other")
    train.train(run_config(data_root, total_steps=3), other)
    shutil.copytree(os.path.join(straight, features.CACHE_DIR), os.path.join(str(tmp_path / "moved"), "features"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.train(with_keys(config, init=other, total_steps=1), str(tmp_path / "moved"))
    assert "was built from other weights, data or settings; rebuilding" in caplog.text


def with_keys(config, **overrides):
    copy = config.copy_and_resolve_references()
    copy.update(overrides)
    return copy
