"""Run configs: every key's default (`defaults.py`), the protocols (`protocol.py`), the checks (`checks.py`), and
the one way a program turns what it was given into the config it runs:

    config = runconfig.prepare(flag_value)   # completed from base_config(), every value checked, locked
    config.remat_policy                      # plain attribute access from here on: no defaults repeated

A config is completed from `base_config()` (a config file written before a key existed runs with its default;
a key `base_config()` does not know is an error naming it), checked once before anything is built, and locked,
so a misspelt key set later (`config.remat_polcy = ...`) fails at once instead of adding a field nothing reads.

Imports, for every module here: each other and `data`, `evaluation.scoring`, `files`, `models`, `parallel`, `stages`,
`training.optim`, `training.programs` (the tables of values the checks accept).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.runconfig.checks import check_choice, data_config, validate
from contextblip_jax.runconfig.defaults import base_config

__all__ = ["check_choice", "config_file", "data_config", "model_config", "parse_args", "prepare"]


def prepare(given: ml_collections.ConfigDict, data: bool = True, weights: bool = True) -> ml_collections.ConfigDict:
    """`given` completed from `base_config()`, checked (`checks.validate`: `data` and `weights` say whether the
    ImageCoDe folder and `init` must be there) and locked."""
    config = complete(given)
    validate(config, data=data, weights=weights)
    config.lock()
    return config


def complete(given: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`base_config()` with every value of `given` set over it; a key of `given` that it lacks is an error."""
    config = base_config()
    _merge(config, given.to_dict() if hasattr(given, "to_dict") else dict(given), "")
    return config


def _merge(into: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        if key not in into:
            known = ", ".join(sorted(into.keys()))
            raise ValueError(f"unknown config key {prefix}{key}; {prefix or 'the top level '}has {known}")
        if isinstance(into[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _merge(into[key], value, f"{prefix}{key}.")
        else:
            into[key] = value


def model_config(config: ml_collections.ConfigDict) -> ContextBLIPConfig:
    return ContextBLIPConfig.from_dict(config.model.to_dict())


def config_file(name: str, arg: str = "") -> ml_collections.ConfigDict:
    """`configs/<name>.py:<arg>` of this checkout, loaded as the `--config` flag loads it: for programs and tests
    that build a run's config without the flag."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(root, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parse_args(arg: str, **defaults: str) -> dict[str, str]:
    """A config file's `:key=value,...` argument over its `defaults`; a key it does not take is an error naming the
    ones it does (`configs/imagecode.py:stage=context,variant=L/16`)."""
    given = dict(item.split("=", 1) if "=" in item else (item, "") for item in arg.split(",") if item)
    if unknown := sorted(set(given) - set(defaults)):
        raise ValueError(f"unknown config argument(s) {unknown}; this config takes {sorted(defaults)}")
    return {**defaults, **given}
