"""The keys every run config has, with their defaults and meaning; `configs/*.py` start from `base_config()`.

Every key can be overridden on the command line: `--config.total_steps=100 --config.data.root=/data/imagecode`.

| key | meaning |
|---|---|
| `stage` | `pretrain` (stage 1 on captions), `zeroshot` (evaluation only), `finetune` (2a), `context` (2b) |
| `seed` | model initialisation, dropout, TMIM masks and hard negatives (folded with the step) |
| `total_steps`, `log_every`, `eval_every`, `checkpoint_every`, `keep_checkpoints` | loop cadence |
| `mesh` | sizes of the (`data`, `fsdp`, `tensor`) mesh axes; -1 = the remaining devices |
| `logical_rules` | logical axis -> mesh axis pairs; empty = `parallel.DEFAULT_RULES` |
| `dtype` | compute dtype (`float32` on CPU tests, `bfloat16` on TPU/GPU); parameters stay float32 |
| `remat` | towers whose blocks are recomputed in the backward pass: `()`, `("vision",)`, `("vision", "text")` |
| `grad_accum_steps` | micro-batches per optimizer step, inside the jitted step |
| `trainable` | regex over parameter paths that train; empty = the stage's default (`models.contextblip.TRAINABLE`) |
| `init` | weights to start from: empty = random; a converted folder, a PyTorch checkpoint, or the workdir |
|        | of the previous stage (its latest checkpoint) |
| `model` | the ContextBLIP architecture (`ContextBLIPConfig` fields, nested) |
| `optimizer` | `name` (adam, adamw), `b1`, `b2`, `eps`, `weight_decay`, `lr`, `head_lr` + `head_pattern` |
|             | (a second group), `warmup_steps`, `warmup_init`, `decay_per_epoch`, `steps_per_epoch` (0 = derived |
|             | from the data), `min_lr` |
| `loss` | `itm`, `tmim`, `mask_prediction` weights; `temperature` of hard-negative sampling (0 = none) |
| `data` | `data.pipeline.DataConfig` fields, plus `synthetic` (generate this many sets under `root` if absent) |
| `eval` | `splits` evaluated during training, `batch_size` |
| `nan_check` | stop (keeping the last good checkpoint) when the loss is NaN or Inf |
"""

from __future__ import annotations

import dataclasses

import ml_collections

from contextblip_jax.models.config import ContextBLIPConfig

STAGES = ("pretrain", "zeroshot", "finetune", "context")


def model_dict(config: ContextBLIPConfig) -> dict:
    """A ContextBLIP config as plain nested dicts/lists, the form ml_collections overrides need."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        return value

    return plain(dataclasses.asdict(config))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "finetune"
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.mesh = (-1, 1, 1)
    c.logical_rules = ()
    c.dtype = "float32"
    c.remat = ()
    c.grad_accum_steps = 1
    c.trainable = ""
    c.init = ""
    c.model = model_dict(ContextBLIPConfig())
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adam",
            b1=0.9,
            b2=0.98,
            eps=1e-6,
            weight_decay=0.2,
            lr=2e-6,
            head_lr=1e-4,
            head_pattern=r"^head\.",
            warmup_steps=0,
            warmup_init=1e-6,
            decay_per_epoch=0.95,
            steps_per_epoch=0,
            min_lr=0.0,
        )
    )
    c.loss = ml_collections.ConfigDict(dict(itm=1.0, tmim=1.0, mask_prediction=0.0, temperature=0.0))
    c.data = ml_collections.ConfigDict(
        dict(
            root="",
            source="folder",
            tfds_dir="",
            annotations=(),
            on_error="raise",
            image_size=224,
            max_text_length=64,
            first_token="enc",
            batch_size=36,
            workers=0,
            threads=2,
            prefetch=2,
            worker_buffer=1,
            seed=0,
            shuffle=True,
            num_epochs=ml_collections.FieldReference(None, field_type=int),
            jpeg_draft=False,
            vocab=ml_collections.FieldReference(None, field_type=str),
            augment=dict(
                random_resized_crop=False,
                crop_scale=(0.2, 1.0),
                crop_ratio=(0.75, 1.3333333333333333),
                randaugment_layers=0,
                randaugment_magnitude=5,
                flip="off",
                flip_probability=0.5,
            ),
            synthetic=0,
        )
    )
    c.eval = ml_collections.ConfigDict(dict(splits=("valid",), batch_size=36))
    c.nan_check = True
    return c
