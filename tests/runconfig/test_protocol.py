"""The protocol switch: each config file's default, every key of both protocols, and that single keys still mix."""

from __future__ import annotations

import pytest

from contextblip_jax.models.config import flatten_dict
from contextblip_jax.runconfig import defaults, protocol
from tests.runs import config_file


@pytest.mark.parametrize("name", ["imagecode", "pretrain"])
def test_the_authors_protocol_is_the_default_of_the_real_data_configs(name):
    values = flatten_dict(config_file(name).to_dict())
    assert values["protocol"] == "authors"
    for key, value in protocol.PROTOCOLS["authors"].items():
        assert values[key] == value, key
    assert values["model.init"] == "torch"


@pytest.mark.parametrize("name", ["imagecode", "pretrain", "synthetic"])
def test_improved_sets_every_key_of_its_row(name):
    values = flatten_dict(config_file(name, "protocol=improved").to_dict())
    expected = dict(protocol.PROTOCOLS["improved"])
    if name == "synthetic":  # clamped to the small model's positions
        expected["data.max_text_length"] = min(64, values["model.blip.text.max_positions"])
    assert {key: values[key] for key in expected} == expected


def test_the_two_protocols_differ_in_the_documented_keys_only():
    authors, improved = protocol.PROTOCOLS["authors"], protocol.PROTOCOLS["improved"]
    assert set(authors) == set(improved)
    differing = {key for key in authors if authors[key] != improved[key]}
    assert differing == {
        "data.pre_caption_words",
        "data.max_text_length",
        "data.augment.per_image",
        "data.augment.ops",
        "data.augment.flip",
        "data.group_by_set",
        "context.cache_features",
        "loss.negatives",
        "loss.tmim_token",
    }


def test_every_protocol_key_exists_in_the_base_config():
    keys = set(flatten_dict(defaults.base_config().to_dict()))
    for table in protocol.PROTOCOLS.values():
        assert set(table) <= keys


def test_the_main_job_default_applies_no_protocol():
    values = flatten_dict(config_file("synthetic").to_dict())
    assert values["protocol"] == "" and values["dropout.text"] == 0.0 and values["data.augment.flip"] == "off"


def test_an_unknown_protocol_is_an_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="authors"):
        config_file("imagecode", "protocol=paper")


def test_stage_one_cleans_with_blip_rules_under_the_authors_protocol_only():
    assert config_file("pretrain").data.pre_caption_rules == "blip"
    assert config_file("imagecode").data.pre_caption_rules == "albef"
    assert config_file("synthetic", "stage=pretrain,protocol=authors").data.pre_caption_rules == "blip"


def test_pretrain_counts_its_steps_from_the_captions():
    config = config_file("pretrain")
    assert config.total_steps == 0 and config.epochs == 20 and config.optimizer.steps_per_epoch == 0
