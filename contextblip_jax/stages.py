"""The stage table: everything that differs between ContextBLIP's stages, one row per stage.

| stage    | trains                          | data     | loss                                  | scores              |
|----------|---------------------------------|----------|---------------------------------------|---------------------|
| pretrain | adapter, TMIM, mask head        | captions | ITM (hard negatives) + TMIM, averaged | (none)              |
| zeroshot | nothing                         | ImageCoDe| (none)                                | ITM match prob.     |
| finetune | both BLIP towers, adapter, head | ImageCoDe| candidate CE, summed over descriptions| head logits         |
| context  | the inter-context encoder       | ImageCoDe| candidate CE, summed over descriptions| context + head      |

The paper's stage 1 is `pretrain`, 2a `finetune` and 2b `context`. Stage 2a trains "the whole model" as the paper
says, except the parts its logits never use (TMIM, the ITC projections and the ITM head), which stay as stage 1
left them. Epoch counts are the authors' (their `train_*.sh` scripts). The trainer, the evaluator, `predict` and
the configs read this table and nothing else about stages: adding a stage means adding a row.

Imports: `losses`, `models`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from contextblip_jax import losses
from contextblip_jax.models.contextblip import ContextBLIP, trainable_filter

Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
"""`loss(model, batch, key, loss_config, groups=1) -> (scalar, metrics)`; `loss_config` is the run config's
`loss`; `groups` the per-device blocks stage 1 draws its negatives within (1: the whole batch;
`step.make_train_step`). Every loss
trains with dropout on (`nnx.Rngs` from `key`; its rates: `contextblip.set_dropout`, `ContextConfig.dropout`)."""
ScoreFn = Callable[..., jax.Array]
"""`score(model, batch, rngs=None) -> [B, candidates]`; the prediction is the argmax; `rngs` enables dropout."""
MatchFn = Callable[[ContextBLIP, jax.Array], jax.Array]
"""`match(model, first) -> [...]`: one candidate's score from its own ITM first token [..., D] alone, the score a
heatmap explains (`models/gradcam.py`)."""

IMAGECODE_FIELDS = ("images", "input_ids", "attention_mask", "target", "is_video")
SET_INDEX = "set_index"
"""A grouped batch's field (`data/grouped.py`): images come once per set, and each description names its set."""
FEATURES = "features"
"""A cached stage-2b batch's field: each description's 10 normalised ITM vectors, in place of images and text."""
FEATURE_FIELDS = (FEATURES, "target", "is_video")
CAPTION_FIELDS = ("images", "input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training or evaluation stage.

    trainable: regular expression over dotted parameter paths (`blip.vision.blocks.0.fc1.kernel`) of what trains
        by default; the run config's `trainable` overrides it.
    data: "imagecode" (descriptions x 10 candidates) or "captions" (image-caption pairs, stage 1).
    batch_fields: the batch entries the loss and the scores consume; nothing else goes to the device.
    loss: None for a stage that does not train. reduction: how the loss combines examples, hence micro-batches
        ("sum": summed, as the authors sum the candidate cross-entropy; "mean": averaged).
    score: None for a stage without candidate scores (stage 1 is not evaluated on ImageCoDe).
    epochs: the authors' number of epochs.
    features: its scores can start from cached candidate features (`FEATURES`), its towers being frozen
        (`context.cache_features`, `evaluation/features.py`).
    match: the per-candidate score of its ITM pass that heatmaps explain (`MatchFn`); None without scores. Stage
        2b's is 2a's head on its frozen towers: its own score mixes the 10 candidates, so one candidate's
        gradient would spread over the others' images.
    """

    name: str
    trainable: str
    data: str
    batch_fields: tuple[str, ...]
    loss: LossFn | None
    reduction: str
    score: ScoreFn | None
    epochs: int
    features: bool = False
    match: MatchFn | None = None

    @property
    def trains(self) -> bool:
        return self.loss is not None

    @property
    def evaluates(self) -> bool:
        return self.score is not None

    def trainable_filter(self, pattern: str = "") -> nnx.filterlib.Filter:
        """An NNX filter for the parameters that train: `pattern` if given, else the stage's default."""
        return trainable_filter(pattern or self.trainable)


def _pretrain_loss(model: ContextBLIP, batch: Batch, key: jax.Array, config: Any, groups: int = 1):
    """Negatives and masks draw from one half of `key`, dropout from the other, so that neither reuses the
    other's draws; at dropout rate 0 the dropout half is never used."""
    loss_key, dropout_key = jax.random.split(key)
    terms = model.pretrain_losses(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        loss_key,
        config.temperature or None,
        groups=groups,
        tmim_token=config.tmim_token,
        rngs=nnx.Rngs(dropout=dropout_key),
    )
    total = config.itm * terms["itm"] + config.tmim * terms["tmim"]
    if "mask_prediction" in terms:
        total = total + config.mask_prediction * terms["mask_prediction"]
    return total, terms


def _zero_shot_scores(model: ContextBLIP, batch: Batch, rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs
    return model.zero_shot_scores(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get(SET_INDEX))


def _finetune_scores(model: ContextBLIP, batch: Batch, rngs: nnx.Rngs | None = None) -> jax.Array:
    args = (batch["images"], batch["input_ids"], batch["attention_mask"])
    return model.finetune_logits(*args, rngs, set_index=batch.get(SET_INDEX))


def _context_scores(model: ContextBLIP, batch: Batch, rngs: nnx.Rngs | None = None) -> jax.Array:
    if FEATURES in batch:  # the frozen towers' output, computed once (`training/feature_cache.py`)
        return model.context_logits_from_features(batch[FEATURES], batch["is_video"], rngs)
    args = (batch["images"], batch["input_ids"], batch["attention_mask"], batch["is_video"])
    return model.context_logits(*args, rngs=rngs, set_index=batch.get(SET_INDEX))


def _head_logits(model: ContextBLIP, first: jax.Array) -> jax.Array:
    return model.head_logits(first)


def _match_probability(model: ContextBLIP, first: jax.Array) -> jax.Array:
    return model.match_probability(first)


def _candidate_loss(score: ScoreFn) -> LossFn:
    """Cross-entropy over each description's candidate scores (dropout on), summed over descriptions; metrics:
    the accuracy of the real descriptions and `filled`, the share of description slots they fill."""

    def loss(model: ContextBLIP, batch: Batch, key: jax.Array, config: Any, groups: int = 1):
        del config, groups
        logits = score(model, batch, rngs=nnx.Rngs(dropout=key))
        real = batch["target"] >= 0  # grouped batches pad the description slots their set slots could not fill
        correct = jnp.sum(real & (jnp.argmax(logits, axis=-1) == batch["target"]))
        metrics = {"accuracy": correct / jnp.maximum(real.sum(), 1), "filled": real.mean()}
        return losses.candidate_loss(logits, batch["target"], "sum"), metrics

    return loss


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            name="pretrain",
            trainable=r"^(adapter|tmim|mask_head)\.",
            data="captions",
            batch_fields=CAPTION_FIELDS,
            loss=_pretrain_loss,
            reduction="mean",
            score=None,
            epochs=20,
        ),
        Stage(
            name="zeroshot",
            trainable=r"(?!)",
            data="imagecode",
            batch_fields=IMAGECODE_FIELDS,
            loss=None,
            reduction="mean",
            score=_zero_shot_scores,
            epochs=0,
            match=_match_probability,
        ),
        Stage(
            name="finetune",
            trainable=r"^(blip\.(vision|text)|adapter|head)\.",
            data="imagecode",
            batch_fields=IMAGECODE_FIELDS,
            loss=_candidate_loss(_finetune_scores),
            reduction="sum",
            score=_finetune_scores,
            epochs=40,
            match=_head_logits,
        ),
        Stage(
            name="context",
            trainable=r"^context\.",
            data="imagecode",
            batch_fields=IMAGECODE_FIELDS,
            loss=_candidate_loss(_context_scores),
            reduction="sum",
            score=_context_scores,
            epochs=20,
            features=True,
            match=_head_logits,
        ),
    )
}


def get(name: str) -> Stage:
    """The stage called `name`; an unknown name is an error listing the known ones."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {tuple(STAGES)}")
    return STAGES[name]
