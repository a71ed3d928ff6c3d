"""The stage table: every row is consistent, and the trainer's data gives each stage what it reads."""

from __future__ import annotations

import re

import pytest

from contextblip_jax import stages


@pytest.mark.parametrize("stage", stages.STAGES.values(), ids=list(stages.STAGES))
def test_rows_are_consistent(stage):
    assert stages.get(stage.name) is stage
    re.compile(stage.trainable)
    assert stage.trains == (stage.loss is not None)
    assert stage.reduction in ("sum", "mean")
    assert stage.data in ("imagecode", "captions")
    fields = stages.CAPTION_FIELDS if stage.data == "captions" else stages.IMAGECODE_FIELDS
    assert set(stage.batch_fields) <= set(fields)
    assert stage.evaluates == (stage.score is not None)
    assert stage.epochs >= 0 and (stage.epochs > 0) == stage.trains


def test_the_papers_stages_and_their_epochs():
    assert {name: (s.trains, s.evaluates, s.epochs) for name, s in stages.STAGES.items()} == {
        "pretrain": (True, False, 20),
        "zeroshot": (False, True, 0),
        "finetune": (True, True, 40),
        "context": (True, True, 20),
    }


def test_unknown_stage_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown stage 'warmup'; expected one of \('pretrain', 'zeroshot'"):
        stages.get("warmup")


def test_trainable_override_replaces_the_default():
    model_paths = ["context.position", "head.proj.kernel", "blip.vision.norm.scale"]
    stage = stages.get("context")

    def selected(pattern: str) -> list[str]:
        compiled = re.compile(pattern or stage.trainable)
        return [p for p in model_paths if compiled.search(p)]

    assert selected("") == ["context.position"]
    assert selected(r"^(context|head)\.") == ["context.position", "head.proj.kernel"]
