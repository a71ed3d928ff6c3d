r"""Stage 1: intra-context pre-training on COCO + Visual Genome captions (the authors'
`main.py` with `configs/pretrain.yaml`).

    python -m contextblip_jax.train --config=configs/pretrain.py --workdir=W_stage1 \
        --config.data.root=/data/images --config.data.annotations='("/data/coco.json","/data/vg.json")' \
        --config.init=/ckpt/model_base_14M.pth

Adapter + TMIM train, BLIP frozen: AdamW, weight decay 0.05, lr 3e-4, linear warm-up from 1e-6 over 3,000
steps, then ×0.9 per epoch (floor 1e-6), 20 epochs over the captions (each caption one example; the steps per
epoch are the caption count of the annotation files / 1,024, counted at start), global batch 1,024, 224 px.
Variants (`contextblip_jax/models/variants.py`): `:variant=B/16` (default), `L/16`, or the smaller test rows.
`:protocol=authors` (default): `pre_caption` to 30 words, 30 tokens, RandomResizedCrop(0.2-1) + BLIP's
RandAugment(2, 5) + plain flip, hard negatives within each device's batch, one TMIM guiding position for the
batch; `:protocol=improved`: 64 tokens, text-aware flip, negatives from the global batch, a real guiding token per
caption (`contextblip_jax/runconfig/protocol.py`).
"""

from contextblip_jax import stages
from contextblip_jax.models.variants import variant
from contextblip_jax.runconfig import parse_args, protocol
from contextblip_jax.runconfig.defaults import base_config, model_dict


def get_config(arg: str = ""):
    args = parse_args(arg, protocol="authors", variant="B/16")
    stage = stages.get("pretrain")
    c = base_config()
    c.stage = stage.name
    model = variant(args["variant"])
    c.model = model_dict(model)
    c.model.init = "torch"
    c.data.update(batch_size=1024, image_size=model.blip.vision.image_size)
    c.data.augment.update(
        random_resized_crop=True, crop_scale=(0.2, 1.0), randaugment_layers=2, randaugment_magnitude=5
    )
    protocol.apply(c, args["protocol"])
    c.total_steps = 0  # epochs x the caption count of the annotation files / batch, counted at start
    c.epochs = stage.epochs
    c.optimizer.update(
        name="adamw",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        lr=3e-4,
        head_lr=3e-4,
        warmup_steps=3000,
        warmup_init=1e-6,
        decay_per_epoch=0.9,
        min_lr=1e-6,
        steps_per_epoch=0,
    )
    c.loss.update(itm=1.0, tmim=1.0)
    c.log_every = 50
    c.eval_every = 0
    c.checkpoint_every = 1000
    c.dtype = "bfloat16"
    return c
