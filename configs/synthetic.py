r"""The CPU main job: ContextBLIP on generated ImageCoDe-layout data (10 coloured-shape images per set).

    python -m contextblip_jax.train --config=configs/synthetic.py --workdir=workdirs/synthetic

Generates the data under `data.root` if it is absent, trains a small model from scratch (stage 2a: whole model
and scoring head), evaluates on the validation split and prints where the curve and metrics are. Every stage is
available with `:stage=pretrain|finetune|context` (`init` names the previous stage's workdir):

    python -m contextblip_jax.train --config=configs/synthetic.py:stage=finetune --workdir=workdirs/s2a
    python -m contextblip_jax.train --config=configs/synthetic.py:stage=context --workdir=workdirs/s2b \
        --config.init=workdirs/s2a

Stage 1 (`:stage=pretrain`) reads `captions.json`, written beside the generated sets: each training target with
its description. Point it at another ImageCoDe-layout folder with `--config.data.root=PATH --config.data.synthetic=0`.
"""

from contextblip_jax.models.config import (
    AdapterConfig,
    BlipConfig,
    ContextBLIPConfig,
    ContextConfig,
    TextConfig,
    TMIMConfig,
    VisionConfig,
)
from contextblip_jax.trainconfig import base_config, model_dict


def parse(arg: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in arg.split(",") if item)


def get_config(arg: str = ""):
    args = {"stage": "finetune", **parse(arg)}
    c = base_config()
    c.stage = args["stage"]
    c.total_steps = 1500
    c.log_every = 10
    c.eval_every = 250
    c.checkpoint_every = 250
    c.model = model_dict(
        ContextBLIPConfig(
            blip=BlipConfig(
                vision=VisionConfig(width=128, depth=4, num_heads=4, mlp_dim=256, image_size=64, patch_size=16),
                text=TextConfig(width=128, depth=2, num_heads=4, mlp_dim=256, max_positions=64, encoder_width=128),
                embed_dim=64,
            ),
            adapter=AdapterConfig(),
            tmim=TMIMConfig(decoder_depth=1, decoder_heads=4, decoder_mlp_dim=256),
            context=ContextConfig(num_heads=4, mlp_dim=256),
        )
    )
    # From scratch, the L2-normalised features give the head tiny logits at first: it needs its own, higher rate.
    c.optimizer.update(
        name="adamw", lr=1e-3, head_lr=1e-2, weight_decay=0.01, warmup_steps=20, warmup_init=0.0, decay_per_epoch=1.0
    )
    c.data.update(root="workdirs/synthetic_data", synthetic=600, image_size=64, max_text_length=24, batch_size=16)
    c.eval.batch_size = 32
    if c.stage == "context":
        c.optimizer.update(lr=1e-4, head_lr=1e-4)
    return c
