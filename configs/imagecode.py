r"""ImageCoDe fine-tuning with the authors' hyperparameters (their `finetune_notf.py` for
2a, `finetune_context.py` for 2b).

    python -m contextblip_jax.train --config=configs/imagecode.py:stage=finetune,variant=B/16 \
        --workdir=W_2a --config.data.root=/data/imagecode --config.init=/ckpt/contextblip_stage1
    python -m contextblip_jax.train --config=configs/imagecode.py:stage=context --workdir=W_2b \
        --config.data.root=/data/imagecode --config.init=W_2a
    python -m contextblip_jax.evaluate --config=configs/imagecode.py:stage=zeroshot --workdir=W_zs \
        --config.data.root=/data/imagecode --config.init=/ckpt/contextblip_stage1

Protocols (`contextblip_jax/runconfig/protocol.py`): `authors` (default) reproduces the authors' recipe: BLIP's
`pre_caption` cut to 30 words and 30 tokens, RandomResizedCrop(0.2-1) + BLIP's RandAugment(2, 5) + a plain flip
drawn for each of the 10 images independently, text and TMIM dropout 0.1, PyTorch-default initialisation of the
parts created fresh; `:protocol=improved` selects the project's choices (64 tokens, one augmentation draw per set
with a flip that swaps left/right words). Both keep the best validation model (`W/best.json`), which `init=W` and
`evaluate` take.

Stages: zeroshot (ITM match probability), finetune (2a: Adam β 0.9/0.98, eps 1e-6, weight decay 0.2, lr 2e-6 for
the model and 1e-4 for the head, ×0.95 per epoch, 40 epochs, 36 descriptions per batch, losses summed),
context (2b: only the inter-context encoder, lr 2e-6, 20 epochs). Epochs come from the stage table
(`contextblip_jax/stages.py`). `init` is a converted checkpoint, an authors' file, a BLIP checkpoint, or the
previous stage's workdir. Variants (`contextblip_jax/models/variants.py`): B/16 (default), L/16. Steps are derived
from epochs with ImageCoDe's 16,594 training descriptions.
"""

from contextblip_jax import stages
from contextblip_jax.models.variants import variant
from contextblip_jax.runconfig import parse_args, protocol
from contextblip_jax.runconfig.defaults import base_config, model_dict

TRAIN_DESCRIPTIONS = 16_594
HEAD_LR = {"zeroshot": 0.0, "finetune": 1e-4, "context": 2e-6}
"""Peak rate of the scoring-head group per stage (2b's only trainable part, the context encoder, runs at 2e-6)."""


def get_config(arg: str = ""):
    args = parse_args(arg, stage="finetune", variant="B/16", protocol="authors")
    stage = stages.get(args["stage"])
    if stage.data != "imagecode":
        raise ValueError(f"configs/imagecode.py runs the ImageCoDe stages {sorted(HEAD_LR)}; use configs/pretrain.py")
    c = base_config()
    c.stage = stage.name
    model = variant(args["variant"])
    c.model = model_dict(model)
    c.model.init = "torch"
    c.data.update(batch_size=36, image_size=model.blip.vision.image_size)
    c.data.augment.update(
        random_resized_crop=True, crop_scale=(0.2, 1.0), randaugment_layers=2, randaugment_magnitude=5
    )
    protocol.apply(c, args["protocol"])
    steps_per_epoch = TRAIN_DESCRIPTIONS // c.data.batch_size
    c.total_steps = max(stage.epochs * steps_per_epoch, 1)
    c.optimizer.update(
        name="adam",
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.2,
        lr=2e-6,
        head_lr=HEAD_LR[stage.name],
        decay_per_epoch=0.95,
        steps_per_epoch=steps_per_epoch,
    )
    c.eval_every = steps_per_epoch
    c.checkpoint_every = steps_per_epoch
    c.log_every = 50
    c.dtype = "bfloat16"
    return c
