r"""Stage 1: intra-context pre-training on COCO + Visual Genome captions (the authors'
`main.py` with `configs/pretrain.yaml`).

    python -m contextblip_jax.train --config=configs/pretrain.py --workdir=W_stage1 \
        --config.data.root=/data/images --config.data.annotations='("/data/coco.json","/data/vg.json")' \
        --config.init=/ckpt/model_base_14M.pth

Adapter + TMIM train, BLIP frozen: AdamW, weight decay 0.05, lr 3e-4, linear warm-up from 1e-6 over 3,000
steps, then ×0.9 per epoch (floor 1e-6), 20 epochs, global batch 1,024, 224 px, text cut to 30 tokens (the
authors' value; `--config.data.max_text_length` changes it), RandomResizedCrop(0.2-1) + RandAugment(2, 5) +
text-aware flip. `steps_per_epoch` must be set to the caption count / 1,024 of the annotation files used.
"""

from contextblip_jax import stages
from contextblip_jax.trainconfig import base_config, parse_args

CAPTIONS = 5_700_000  # COCO + VG pairs in BLIP's coco.json + vg.json, approximately


def get_config(arg: str = ""):
    parse_args(arg)
    stage = stages.get("pretrain")
    c = base_config()
    c.stage = stage.name
    c.data.update(batch_size=1024, image_size=224, max_text_length=30)
    c.data.augment.update(random_resized_crop=True, crop_scale=(0.2, 1.0), randaugment_layers=2, flip="text_aware")
    steps_per_epoch = CAPTIONS // c.data.batch_size
    c.total_steps = stage.epochs * steps_per_epoch
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
        steps_per_epoch=steps_per_epoch,
    )
    c.loss.update(itm=1.0, tmim=1.0)
    c.log_every = 50
    c.eval_every = 0
    c.checkpoint_every = 1000
    c.dtype = "bfloat16"
    return c
