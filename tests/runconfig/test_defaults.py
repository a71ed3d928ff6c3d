"""Run configs: one source of defaults, `:key=value` arguments, and checks before anything is built."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contextblip_jax import runconfig, stages
from contextblip_jax.data.augment import AugmentConfig
from contextblip_jax.data.pipeline import DataConfig
from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.runconfig import checks, data_config, defaults
from tests.runs import config_file


def test_sections_are_derived_from_the_dataclasses_that_consume_them():
    config = defaults.base_config()
    assert data_config(config, train=True) == DataConfig()
    assert config.data.augment.to_dict() == {f.name: getattr(AugmentConfig(), f.name) for f in
                                             dataclasses.fields(AugmentConfig)}  # fmt: skip
    assert runconfig.model_config(config) == ContextBLIPConfig()


def test_optional_fields_can_still_be_set():
    config = defaults.base_config()
    config.data.num_epochs = 3
    config.data.vocab = "/path/vocab.txt"
    assert data_config(config, train=True).num_epochs == 3


def test_evaluation_data_has_no_augmentation_and_the_eval_batch():
    config = config_file("imagecode")
    evaluation = data_config(config, train=False)
    assert not evaluation.augment.enabled and evaluation.batch_size == config.eval.batch_size
    assert data_config(config, train=True).augment.enabled


KEYS = st.text(alphabet="abcdefghij_", min_size=1, max_size=8)
VALUES = st.text(alphabet="abc/=.-0123456789", max_size=8)


@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_arguments_parse_back(values):
    defaults = {key: "default" for key in values} | {"stage": "finetune"}
    arg = ",".join(f"{key}={value}" for key, value in values.items())
    assert runconfig.parse_args(arg, **defaults) == {**defaults, **values}


def test_unknown_argument_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['varaint'\]; this config takes"):
        runconfig.parse_args("varaint=L/16", stage="finetune", variant="B/16")


@pytest.mark.parametrize(
    ("arg", "message"),
    [("stage=warmup", "unknown stage"), ("variant=XL", "unknown model variant 'XL'"), ("stage=pretrain", "pretrain")],
)
def test_configs_refuse_what_they_cannot_run(arg, message):
    with pytest.raises(ValueError, match=message):
        config_file("imagecode", arg)


@pytest.mark.parametrize("name", ["imagecode", "pretrain", "synthetic"])
def test_variants_give_the_configs_their_architectures_and_image_size(name):
    """Every config takes `variant=`, and its images are the size that variant's vision tower was built for
    (`python -m contextblip_jax.fit --variants=tiny` compiled the imagecode stages at 224 px for a 32 px tower)."""
    assert config_file(name, "variant=L/16").model.blip.vision.width == 1024
    for row in ("tiny", "small", "B/16"):
        config = config_file(name, f"variant={row}")
        assert config.data.image_size == config.model.blip.vision.image_size
    assert config_file(name, "variant=tiny").data.image_size == 32


def test_a_run_without_imagecode_says_what_to_get_and_where(tmp_path):
    config = config_file("imagecode", "stage=finetune")
    with pytest.raises(FileNotFoundError, match=r"data.root is not set\. .*Zenodo record 6518944.*image-sets"):
        checks.check_imagecode_folder(config, stages.get("finetune"))
    (tmp_path / "train_data.json").write_text("{}")
    config.data.root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"lacks valid_data\.json, test_data_unlabeled\.json, image-sets"):
        checks.check_imagecode_folder(config, stages.get("finetune"))
    checks.check_imagecode_folder(config, stages.get("pretrain"))  # stage 1 reads captions


def test_the_remat_policy_is_checked_before_anything_is_built():
    config = config_file("synthetic", "variant=tiny")
    assert config.remat_policy == "full"
    config.remat_policy = "dots"
    runconfig.prepare(config)
    config.remat_policy = "everything"
    with pytest.raises(ValueError, match=r"remat_policy 'everything' unknown; choose from \('full', 'dots_no_batch'"):
        runconfig.prepare(config)
