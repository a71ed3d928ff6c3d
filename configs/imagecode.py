r"""ImageCoDe fine-tuning with the reference's hyperparameters (contextblip.md §6).

    python -m contextblip_jax.train --config=configs/imagecode.py:stage=finetune,variant=B/16 \
        --workdir=W_2a --config.data.root=/data/imagecode --config.init=/ckpt/contextblip_stage1
    python -m contextblip_jax.train --config=configs/imagecode.py:stage=context --workdir=W_2b \
        --config.data.root=/data/imagecode --config.init=W_2a
    python -m contextblip_jax.evaluate --config=configs/imagecode.py:stage=zeroshot --workdir=W_zs \
        --config.data.root=/data/imagecode --config.init=/ckpt/contextblip_stage1

Stages: zeroshot (ITM match probability), finetune (2a: Adam β 0.9/0.98, eps 1e-6, weight decay 0.2, lr 2e-6 for
the model and 1e-4 for the head, ×0.95 per epoch, 40 epochs, 36 descriptions per batch, losses summed),
context (2b: only the inter-context encoder, lr 2e-6, 20 epochs). `init` is a converted checkpoint, an
authors' file, a BLIP checkpoint, or the previous stage's workdir. Variants: B/16 (default), L/16.
Steps are derived from epochs with ImageCoDe's 16,594 training descriptions.
"""

from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig, TextConfig, VisionConfig
from contextblip_jax.trainconfig import base_config, model_dict

TRAIN_DESCRIPTIONS = 16_594
VARIANTS = {
    "B/16": BlipConfig(),
    "L/16": BlipConfig(
        vision=VisionConfig(width=1024, depth=24, num_heads=16, mlp_dim=4096), text=TextConfig(encoder_width=1024)
    ),
}
EPOCHS = {"finetune": 40, "context": 20, "zeroshot": 0}


def get_config(arg: str = ""):
    args = {"stage": "finetune", "variant": "B/16", **dict(i.split("=", 1) for i in arg.split(",") if i)}
    if args["variant"] not in VARIANTS:
        raise ValueError(f"unknown variant {args['variant']!r}; expected one of {sorted(VARIANTS)}")
    if args["stage"] not in EPOCHS:
        raise ValueError(f"unknown stage {args['stage']!r}; expected one of {sorted(EPOCHS)}")
    c = base_config()
    c.stage = args["stage"]
    c.model = model_dict(ContextBLIPConfig(blip=VARIANTS[args["variant"]]))
    c.data.update(batch_size=36, image_size=224, max_text_length=64)
    c.data.augment.update(random_resized_crop=True, crop_scale=(0.2, 1.0), randaugment_layers=2, flip="text_aware")
    steps_per_epoch = TRAIN_DESCRIPTIONS // c.data.batch_size
    c.total_steps = max(EPOCHS[c.stage] * steps_per_epoch, 1)
    c.optimizer.update(
        name="adam",
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.2,
        lr=2e-6,
        head_lr=1e-4,
        decay_per_epoch=0.95,
        steps_per_epoch=steps_per_epoch,
    )
    if c.stage == "context":
        c.optimizer.update(head_lr=2e-6)
    c.eval_every = steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    c.log_every = 50
    c.dtype = "bfloat16"
    return c
