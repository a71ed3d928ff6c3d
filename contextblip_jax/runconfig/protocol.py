"""Training protocols: `authors` reproduces the authors' recipe, `improved` selects the project's own choices.

A config file takes `:protocol=authors` (the default of `configs/imagecode.py` and `configs/pretrain.py`) or
`:protocol=improved`; each difference is a run-config key of its own, so any mix can be run by overriding single
keys after it (`--config.data.max_text_length=64`). `docs/fidelity.md` gives every difference and why.

| key                       | authors        | improved        | why the project differs                            |
|---------------------------|----------------|-----------------|----------------------------------------------------|
| data.pre_caption_words    | 30             | 0 (text as is)  | longer descriptions keep their last details        |
| data.max_text_length      | 30             | 64              | 30 tokens cut about 16% of ImageCoDe's descriptions |
| data.augment.per_image    | True           | False           | independent draws make candidates differ           |
| data.augment.ops          | blip           | project         | the project's adds contrast, bounds shifts         |
| data.augment.flip         | plain          | text_aware      | a flip swaps "left"/"right" in the text too         |
| data.group_by_set         | False          | True            | a set's images encoded once for its descriptions    |
| context.cache_features    | False          | True            | 2b's frozen towers run once, not every epoch        |
| loss.negatives            | per_device     | global          | harder negatives from every device's examples       |
| loss.tmim_token           | batch          | example         | one real token per example, never padding           |

Stage 1 under `authors` also cleans captions with BLIP's rules (`data.pre_caption_rules="blip"`, the authors'
stage-1 reader), not the fine-tuning ones. Both protocols: BLIP's text encoder and TMIM decoder dropout 0.1,
stage 1 iterating over captions, the best validation model kept (`best.py`), heads in float32. `model.init`
(PyTorch defaults for the parts created fresh) is set by the configs that load BLIP weights: a model trained from
scratch (`configs/synthetic.py`) keeps its own.

Imports: its own package (`runconfig`), `stages`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from contextblip_jax import stages

COMMON: dict[str, Any] = {
    "dropout.text": 0.1,
    "dropout.tmim": 0.1,
    "data.caption_sampling": "caption",
}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "authors": {
        **COMMON,
        "data.pre_caption_words": 30,
        "data.max_text_length": 30,
        "data.augment.per_image": True,
        "data.augment.ops": "blip",
        "data.augment.flip": "plain",
        "data.group_by_set": False,
        "context.cache_features": False,
        "loss.negatives": "per_device",
        "loss.tmim_token": "batch",
    },
    "improved": {
        **COMMON,
        "data.pre_caption_words": 0,
        "data.max_text_length": 64,
        "data.augment.per_image": False,
        "data.augment.ops": "project",
        "data.augment.flip": "text_aware",
        "data.group_by_set": True,
        "context.cache_features": True,
        "loss.negatives": "global",
        "loss.tmim_token": "example",
    },
}

STAGE_ONE: dict[str, dict[str, Any]] = {"authors": {"data.pre_caption_rules": "blip"}, "improved": {}}
"""Keys a protocol sets on top for stage 1 (the caption stage)."""


def apply(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets the keys of protocol `name` on `config`; an unknown name is an error listing the protocols."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    config.protocol = name
    config.update_from_flattened_dict(PROTOCOLS[name])
    if stages.get(config.stage).data == "captions":
        config.update_from_flattened_dict(STAGE_ONE[name])
