"""`runconfig.prepare`: a config is completed from `base_config()`, every key's bad value is refused before any
model is built (with the message naming the key), and the result is locked against misspelt reads."""

from __future__ import annotations

import ml_collections
import pytest

from contextblip_jax import runconfig
from contextblip_jax.models import contextblip
from contextblip_jax.runconfig.defaults import base_config
from tests.runs import config_file

BAD = {
    "stage": ("second", "unknown stage"),
    "protocol": ("mine", "unknown protocol"),
    "total_steps": (-1, "total_steps -1"),
    "epochs": (-2, "epochs -2"),
    "log_every": (0, "log_every 0"),
    "eval_every": (-1, "eval_every -1"),
    "checkpoint_every": (0, "checkpoint_every 0"),
    "keep_checkpoints": (0, "keep_checkpoints 0"),
    "best.split": ("test", "best.split 'test' is not evaluated"),
    "best.metric": ("loss", "best.metric 'loss' is not in the evaluation rows"),
    "best.mode": ("largest", r"best\.mode must be one of"),
    "mesh": ((2, 0, 1), "sizes must be positive integers or a single -1"),
    "logical_rules": ((("embed", "model"),), "names mesh axes"),
    "dtype": ("float8", "dtype 'float8' unknown"),
    "remat": (("audio",), "remat towers"),
    "remat_policy": ("everything", "remat_policy 'everything' unknown"),
    "attention": ("flash", "attention 'flash' unknown"),
    "grad_accum_steps": (0, "not divisible by grad_accum_steps"),
    "trainable": ("(", "trainable '\\(' is not a regular expression"),
    "init": ("/nowhere/weights", "init /nowhere/weights does not exist"),
    "init_checkpoint": ("newest", "checkpoint choice 'newest'"),
    "optimizer.name": ("sgd", "optimizer.name must be one of"),
    "optimizer.head_pattern": ("[", "optimizer.head_pattern"),
    "optimizer.lr": (-1.0, "optimizer.lr -1.0 must not be negative"),
    "optimizer.head_lr": (-1.0, "optimizer.head_lr"),
    "optimizer.weight_decay": (-0.1, "optimizer.weight_decay"),
    "optimizer.warmup_init": (-1.0, "optimizer.warmup_init"),
    "optimizer.min_lr": (-1.0, "optimizer.min_lr"),
    "optimizer.clip_norm": (-1.0, "optimizer.clip_norm"),
    "optimizer.warmup_steps": (-1, "optimizer.warmup_steps"),
    "optimizer.steps_per_epoch": (-1, "optimizer.steps_per_epoch"),
    "optimizer.b1": (1.0, r"optimizer.b1 1.0 must lie in \[0, 1\)"),
    "optimizer.b2": (-0.5, "optimizer.b2"),
    "optimizer.eps": (0.0, "optimizer.eps 0.0"),
    "optimizer.decay_per_epoch": (0.0, "decay_per_epoch 0.0"),
    "loss.itm": (-1.0, "loss.itm"),
    "loss.tmim": (-1.0, "loss.tmim"),
    "loss.mask_prediction": (-1.0, "loss.mask_prediction"),
    "loss.temperature": (-1.0, "loss.temperature"),
    "loss.negatives": ("local", "loss.negatives 'local' unknown"),
    "loss.tmim_token": ("word", "TMIM text token 'word' unknown"),
    "dropout.text": (1.0, "text dropout 1.0"),
    "dropout.tmim": (-0.1, "tmim dropout -0.1"),
    "eval.splits": (("valid", "dev"), r"eval.splits \['dev'\] unknown"),
    "eval.batch_size": (0, "eval.batch_size 0"),
    "eval.set_slots": (-1, "eval.set_slots -1"),
    "data.root": ("/nowhere/imagecode", "data root /nowhere/imagecode does not exist"),
    "data.synthetic": (-1, "data.synthetic -1"),
    "data.synthetic_kinds": ("shapes:1", "kinds 'shapes:1'"),
    "data.batch_size": (0, "data.batch_size must be positive"),
    "data.image_size": (0, "data.image_size must be positive"),
    "data.max_text_length": (0, "data.max_text_length must be positive"),
    "data.source": ("hub", "data.source must be one of"),
    "data.on_error": ("ignore", "on_error must be one of"),
    "data.workers": (-1, "data.workers"),
    "data.threads": (-1, "data.threads"),
    "data.prefetch": (-1, "data.prefetch"),
    "data.pre_caption_words": (-1, "data.pre_caption_words"),
    "data.pre_caption_rules": ("mine", "data.pre_caption_rules must be one of"),
    "data.caption_sampling": ("word", "data.caption_sampling must be one of"),
    "data.set_slots": (-1, "data.set_slots -1"),
    "context.cache_dtype": ("float16", "context.cache_dtype 'float16' unknown"),
    "data.augment.flip": ("upside", "augment.flip must be one of"),
    "data.augment.ops": ("mine", "augment.ops must be one of"),
    "data.augment.crop_scale": ((0.0, 1.0), "augment.crop_scale"),
    "data.augment.crop_ratio": ((2.0, 1.0), "augment.crop_ratio"),
    "data.augment.randaugment_layers": (-1, "augment.randaugment_layers"),
    "data.augment.randaugment_magnitude": (11.0, "randaugment_magnitude"),
    "data.augment.flip_probability": (1.5, "augment.flip_probability"),
    "data.augment.per_image": (True, "per_image flips images one by one"),  # with flip=text_aware, set below
    "model": (1.0, "tmim.mask_rate 1.0"),  # model.tmim.mask_rate: the model section is checked as a whole
}
"""A bad value of each key that has one, and what the refusal says."""

ANY_VALUE = {
    "seed", "scan_layers", "nan_check", "data.seed", "data.shuffle", "data.jpeg_draft", "data.num_epochs",
    "data.annotations", "data.tfds_dir", "data.vocab", "data.first_token", "data.synthetic_seed",
    "data.worker_buffer", "data.augment.random_resized_crop", "eval.group_by_set",
    "context.cache_features",
    "data.group_by_set",  # refused only beside data.augment.per_image (tests/data/test_grouped_training.py)
}  # fmt: skip
"""Keys every value of whose type is valid (ml_collections refuses another type), or whose value is only checked
where it is read (a vocabulary file, a first-token name the tokenizer knows, a TFDS folder)."""


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and key != "model":
            names += leaves(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def test_every_key_has_a_refused_value_or_is_declared_free():
    keys = set(leaves(base_config()))
    assert keys - set(BAD) - ANY_VALUE == set(), "a new key: give it a bad value in BAD, or add it to ANY_VALUE"
    assert set(BAD) | ANY_VALUE <= keys


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_refused_before_any_model_is_built(key, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(contextblip.ContextBLIP, "__init__", no_model)
    config = config_file("synthetic", "variant=tiny")
    runconfig.prepare(config, data=False)  # the config as given is good
    value, message = BAD[key]
    if key == "data.augment.per_image":
        config.data.augment.flip = "text_aware"
    if key == "data.root":
        config.data.synthetic = 0  # a generated folder is made where it is missing
    config.update_from_flattened_dict({"model.tmim.mask_rate" if key == "model" else key: value})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        runconfig.prepare(config, data=False)


def test_a_config_missing_keys_is_completed_and_an_unknown_key_is_named():
    older = ml_collections.ConfigDict({"stage": "finetune", "total_steps": 5, "optimizer": {"lr": 1e-3}})
    config = runconfig.prepare(older, data=False)
    assert (config.total_steps, config.optimizer.lr, config.remat_policy) == (5, 1e-3, "full")
    with pytest.raises(ValueError, match=r"unknown config key optimizer\.learning_rate"):
        runconfig.prepare(ml_collections.ConfigDict({"optimizer": {"learning_rate": 1.0}}), data=False)


def test_a_prepared_config_refuses_a_misspelt_key():
    config = runconfig.prepare(config_file("synthetic", "variant=tiny"), data=False)
    with pytest.raises(AttributeError):
        config.remat_polcy = "dots"
