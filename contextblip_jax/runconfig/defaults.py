"""Every run-config key, its default and its meaning; `configs/*.py` start from `base_config()`, and
`runconfig.prepare` completes any other config from it.

Any key can be overridden on the command line: `--config.total_steps=100 --config.data.root=/data/imagecode`.
The `model`, `data` and `data.augment` sections are generated from the dataclasses that consume them
(`ContextBLIPConfig`, `DataConfig`, `AugmentConfig`), so each of their defaults and meanings lives in one place:
the dataclass's docstring. The other keys are documented where they are set below.

Imports: its own package (`runconfig`), `data`, `models`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import ml_collections

from contextblip_jax.data.pipeline import DataConfig
from contextblip_jax.models.config import ContextBLIPConfig


def model_dict(config: ContextBLIPConfig) -> dict:
    """A ContextBLIP config as plain nested dicts/lists, the form ml_collections overrides need."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        return value

    return plain(dataclasses.asdict(config))


def dataclass_section(instance: Any) -> ml_collections.ConfigDict:
    """A ConfigDict with a dataclass instance's fields and values (nested dataclasses become sections).

    Fields whose default is None become typed placeholders, so that `--config.x=...` can still set them.
    """
    hints = typing.get_type_hints(type(instance))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            values[field.name] = dataclass_section(value)
        elif value is None:
            values[field.name] = ml_collections.FieldReference(None, field_type=_optional_type(hints[field.name]))
        else:
            values[field.name] = value
    return ml_collections.ConfigDict(values)


def _optional_type(hint: Any) -> type:
    """`int` for `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "finetune"  # a row of `stages.STAGES`: pretrain (1), zeroshot, finetune (2a), context (2b)
    c.seed = 0  # model initialisation, dropout, TMIM masks and hard negatives (folded with the step)
    c.protocol = (
        ""  # the protocol the config file applied (`contextblip_jax/runconfig/protocol.py`): authors | improved
    )
    c.total_steps = 1000  # optimizer steps of the whole run; 0: `epochs` × steps per epoch
    c.epochs = 0  # with total_steps 0: epochs of optimizer.steps_per_epoch steps (0 there: counted from the data)
    c.log_every = 10  # steps between train rows in metrics.jsonl
    c.eval_every = 200  # steps between validation passes (0: only at the end)
    c.checkpoint_every = 200  # steps between checkpoints (one is also written at the end and on SIGTERM)
    c.keep_checkpoints = 2  # newest checkpoints kept on disk (the best model is kept apart, see `best`)
    c.best = ml_collections.ConfigDict(
        dict(
            split="valid",  # evaluation rows that compete for W/best.json and W/best/STEP (best.py)
            metric="acc",  # the row's field compared
            mode="max",  # max: higher is better | min
        )
    )
    c.mesh = (-1, 1, 1)  # sizes of the (data, fsdp, tensor) mesh axes; -1 = the remaining devices
    c.logical_rules = ()  # (logical axis, mesh axes) pairs; empty = axes.DEFAULT_RULES
    c.dtype = "float32"  # compute dtype (bfloat16 on TPU/GPU); parameters stay float32
    c.remat = ()  # towers whose blocks are recomputed in the backward pass: ("vision",), ("vision", "text")
    # what each recomputed block keeps from its forward pass (contextblip.REMAT_POLICIES): full (nothing, the
    # least memory) | dots_no_batch (its weight products' outputs: less recomputation) | dots (also attention's)
    c.remat_policy = "full"
    # run each tower's blocks as one scanned body (models/stack.py): compiled once instead of once per block,
    # for compile time on large targets (ViT-L, TPU pods); costs a copy of the towers' parameters per step
    c.scan_layers = False
    c.attention = "einsum"  # self-attention: einsum | xla | cudnn (fused, NVIDIA GPUs in bfloat16), models/layers.py
    c.grad_accum_steps = 1  # micro-batches per optimizer step, inside the jitted step
    c.trainable = ""  # regex over dotted parameter paths that train; empty = the stage's default
    c.init = ""  # weights to start from: empty = random; a converted folder, a PyTorch checkpoint, a workdir
    c.init_checkpoint = "best"  # init = a workdir: its best (best.json; else latest) | latest | a step number
    c.nan_check = True  # stop (keeping the last good checkpoint) when the loss is NaN or Inf
    c.model = model_dict(ContextBLIPConfig())  # ContextBLIPConfig fields, nested (models/config.py)
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adam",  # adam: L2 added to the gradient (torch.optim.Adam); adamw: decoupled decay
            b1=0.9,  # Adam β1
            b2=0.98,  # Adam β2
            eps=1e-6,  # Adam ε
            weight_decay=0.2,  # L2 (adam) or decoupled (adamw) weight decay
            lr=2e-6,  # peak rate of every trainable parameter outside the head group
            head_lr=1e-4,  # peak rate of the head group
            head_pattern=r"^head\.",  # regex over parameter paths: the head group
            warmup_steps=0,  # linear warm-up steps (0: none)
            warmup_init=1e-6,  # rate at step 0 of the warm-up
            decay_per_epoch=0.95,  # rate × decay_per_epoch at every epoch boundary
            steps_per_epoch=0,  # 0: the training examples per epoch / data.batch_size
            min_lr=0.0,  # floor of the decayed rate
            clip_norm=0.0,  # scale the gradient down to this global norm before the optimizer (0: off)
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            itm=1.0,  # stage 1: weight of the ITM loss
            tmim=1.0,  # stage 1: weight of the TMIM reconstruction loss
            mask_prediction=0.0,  # stage 1: weight of the optional mask-prediction loss
            temperature=0.0,  # hard-negative sampling temperature (0: none, as the authors)
            # stage 1 hard negatives drawn from: global (the whole batch) | per_device (each data × fsdp shard of
            # the micro-batch, as the authors' per-GPU batch; grad_accum_steps must divide each shard's examples)
            negatives="global",
            # TMIM's guiding text token: example (a real token of each caption) | batch (the authors: one position
            # for the whole batch, padding included; models/tmim.py choose_text_positions)
            tmim_token="example",
        )
    )
    c.dropout = ml_collections.ConfigDict(
        dict(
            text=0.0,  # BLIP text encoder dropout in training (embeddings, attention, hidden): authors 0.1
            tmim=0.0,  # TMIM decoder dropout in training: authors 0.1 (their configs/bert_config.json)
        )
    )
    c.data = dataclass_section(DataConfig())  # DataConfig fields (data/pipeline.py), augment: AugmentConfig
    c.data.synthetic = 0  # main job: generate this many training sets (and a fifth as many valid/test) under data.root
    c.data.synthetic_seed = 0  # the generator's seed (data.seed drives shuffling and augmentation only)
    c.data.synthetic_kinds = ""  # its scene kinds and shares ("motion:1,recolour:1"); empty: attributes:0.3,motion:0.7
    c.context = ml_collections.ConfigDict(
        dict(
            # stage 2b trains on its frozen towers' vectors computed once and kept in W/features/ (rebuilt when
            # the weights, the data or the input settings change; evaluation/features.py)
            cache_features=False,
            cache_dtype="float32",  # float32 | bfloat16 (half the disk and memory)
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(
            splits=("valid",),  # ImageCoDe splits evaluated during training
            batch_size=36,  # descriptions per evaluation batch (global)
            group_by_set=True,  # each set's images encoded once for all its descriptions (data/grouped.py)
            set_slots=0,  # sets per grouped batch (global); 0: per data shard its descriptions / 2.27, rounded
        )
    )
    return c
