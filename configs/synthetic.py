r"""The CPU main job: ContextBLIP on generated ImageCoDe-layout data (10 coloured-shape images per set).

    python -m contextblip_jax.train --config=configs/synthetic.py --workdir=workdirs/synthetic

Generates the data under `data.root` if it is absent, trains a small model from scratch (stage 2a: whole model
and scoring head), evaluates on the validation split and prints where the curve and metrics are. Arguments:
`stage` (a row of `contextblip_jax/stages.py`; `init` names the previous stage's workdir) and `variant` (a row of
`contextblip_jax/models/variants.py`; `tiny` is what the trainer tests use):

    python -m contextblip_jax.train --config=configs/synthetic.py:stage=pretrain --workdir=workdirs/s1
    python -m contextblip_jax.train --config=configs/synthetic.py:stage=context --workdir=workdirs/s2b \
        --config.init=workdirs/s2a

`protocol`: empty (default) trains as the main job always has, without augmentation, dropout or text cleaning;
`authors` or `improved` add that protocol's augmentation, text handling, dropout and stage-1 sampling
(`contextblip_jax/runconfig/protocol.py`), for a short end-to-end run of either recipe on generated data:

    python -m contextblip_jax.train --config=configs/synthetic.py:protocol=authors --workdir=workdirs/authors

Stage 1 (`:stage=pretrain`) reads `captions.json`, written beside the generated sets: each training target with
its description. Point it at another ImageCoDe-layout folder with `--config.data.root=PATH --config.data.synthetic=0`.
"""

import dataclasses

from contextblip_jax import stages
from contextblip_jax.models.config import HeadConfig
from contextblip_jax.models.variants import variant
from contextblip_jax.runconfig import parse_args, protocol
from contextblip_jax.runconfig.defaults import base_config, model_dict

RATES = {"pretrain": (1e-3, 1e-2), "zeroshot": (0.0, 0.0), "finetune": (5e-4, 1e-2), "context": (1e-4, 1e-4)}
"""Peak learning rates per stage: (model, scoring head)."""


def get_config(arg: str = ""):
    args = parse_args(arg, stage="finetune", variant="small", protocol="")
    stage = stages.get(args["stage"])
    # Trained from scratch: a learned logit scale lets the head tell 10 near-identical candidates apart from the
    # first step, and PyTorch's fan-in initialisation (see HeadConfig and ContextBLIPConfig.init).
    model = dataclasses.replace(variant(args["variant"]), head=HeadConfig(logit_scale=10.0), init="fan_in")
    c = base_config()
    c.stage = stage.name
    c.model = model_dict(model)
    c.total_steps = 600
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 200
    lr, head_lr = RATES[stage.name]
    c.optimizer.update(
        name="adamw",
        lr=lr,
        head_lr=head_lr,
        weight_decay=0.01,
        warmup_steps=20,
        warmup_init=0.0,
        decay_per_epoch=1.0,
        clip_norm=1.0,
    )
    c.data.update(
        root="workdirs/synthetic_data",
        synthetic=600,
        image_size=model.blip.vision.image_size,
        max_text_length=min(24, model.blip.text.max_positions),
        batch_size=16,
    )
    c.eval.batch_size = 32
    if args["protocol"]:
        c.data.augment.update(random_resized_crop=True, randaugment_layers=2, randaugment_magnitude=5)
        protocol.apply(c, args["protocol"])
        c.data.max_text_length = min(c.data.max_text_length, model.blip.text.max_positions)
    return c
