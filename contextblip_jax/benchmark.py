"""`python -m contextblip_jax.benchmark`: throughput of the project's own jitted steps, one JSON object per line.

    python -m contextblip_jax.benchmark --measure=train --stage=finetune --preset=base --descriptions=2
    python -m contextblip_jax.benchmark --measure=eval --stage=zeroshot --preset=base --dtype=bfloat16
    python -m contextblip_jax.benchmark --measure=adapter --preset=base

Measurements:
- `train`: one optimizer step of `--stage` (forward, backward and the update of the stage's trainable parameters),
  built by `step.make_train_step`, the function the trainer runs, with the stage's optimizer defaults.
- `eval`: the stage's candidate scores for `--descriptions` x `--candidates` images (`step.make_predict_step`).
- `adapter`: zero-shot scoring with the adapter and without it (plain BLIP on the same inputs), and the adapter's
  relative overhead.

Each row holds the median, min and max wall time of `--runs` timed calls after `--warmup` untimed ones, the
compile time apart, XLA's FLOP count of the compiled step (cost analysis), the achieved TFLOP/s and MFU against
the device's peak (`hardware.py`), the compiler's memory estimate and the measured peak. Weights and inputs are
random; the line names the device and the thread count it ran with.

Imports: the model, its variant table, the stage table, the steps, the optimizer and the base config.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from contextblip_jax import hardware, optim, stages
from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.contextblip import REMAT_TOWERS, ContextBLIP, set_remat
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.step import TrainState, make_predict_step, make_train_step, split_model
from contextblip_jax.trainconfig import base_config

PRESETS: dict[str, ContextBLIPConfig] = {
    "tiny": VARIANTS["tiny"],
    "small": VARIANTS["small"],
    "base": VARIANTS["B/16"],
    "large": VARIANTS["L/16"],
}
"""Benchmark names for rows of the variant table (`models/variants.py`)."""

_MEASURE = flags.DEFINE_enum("measure", "train", ["train", "eval", "adapter"], "What to measure (see above).")
_STAGE = flags.DEFINE_enum("stage", "finetune", list(stages.STAGES), "Stage whose step is measured.")
_PRESET = flags.DEFINE_enum("preset", "base", list(PRESETS), "Model size (base: ViT-B/16 at 224 px).")
_DESCRIPTIONS = flags.DEFINE_integer("descriptions", 2, "Descriptions per step (stage 1: image-caption pairs).")
_CANDIDATES = flags.DEFINE_integer("candidates", 10, "Candidate images per description.")
_TEXT_LENGTH = flags.DEFINE_integer(
    "text_length", 64, "Tokens per description, at most the preset's position embeddings (the row says which)."
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
_REMAT = flags.DEFINE_list("remat", [], f"Towers recomputed in the backward pass, from {REMAT_TOWERS}.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed calls; median, min and max are reported.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")


def interleaved_times(fns: list[Callable[[], Any]], runs: int, warmup: int) -> list[list[float]]:
    """Wall times of each function, timed in turns (A, B, A, B, ...) so that drift in the machine's load affects
    all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            bucket.append(time.perf_counter() - start)
    return times


def text_length(config: ContextBLIPConfig) -> int:
    """`--text_length`, cut to what the preset's text tower holds (the tiny preset has 24 positions)."""
    return min(_TEXT_LENGTH.value, config.blip.text.max_positions)


def random_batch(stage: stages.Stage, config: ContextBLIPConfig, descriptions: int, candidates: int, length: int):
    """A batch of the stage's fields and shapes (as the input pipeline delivers them), random values."""
    rng = np.random.default_rng(0)
    size = config.blip.vision.image_size
    per_description = () if stage.data == "captions" else (candidates,)
    image_shape = (descriptions, *per_description, size, size, 3)
    ids = rng.integers(1000, config.blip.text.vocab_size, (descriptions, length))
    fields = {
        "images": rng.standard_normal(image_shape).astype(np.float32),
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones((descriptions, length), np.int32),
        "target": rng.integers(0, candidates, descriptions).astype(np.int32),
        "is_video": np.zeros(descriptions, bool),
    }
    return {name: jnp.asarray(fields[name]) for name in stage.batch_fields}


def step_figures(traced: Any, compiled: Any) -> dict[str, Any]:
    """FLOPs per step and the compiler's memory estimate (None where the backend gives none).

    FLOPs are XLA's cost analysis of the program lowered for the CPU, whatever the device: the count is the
    program's, and on GPUs the compiled program's matrix products are library calls that the GPU's cost analysis
    leaves out (an H100 reported 1.6 TFLOP for a base finetune step of 160 images; the CPU count is 26)."""
    cost = traced.lower(lowering_platforms=("cpu",)).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    estimate = None
    if memory is not None:
        estimate = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    return {"flops_per_step": (cost or {}).get("flops"), "estimated_memory_bytes": estimate}


def measure_step(
    stage: stages.Stage, config: ContextBLIPConfig, train: bool
) -> tuple[list[float], float, dict[str, Any]]:
    """(timed step seconds, compile seconds, compiled figures) of the stage's train or predict step."""
    model = ContextBLIP(config, dtype=jnp.dtype(_DTYPE.value), rngs=nnx.Rngs(0))
    set_remat(model, tuple(_REMAT.value))
    spec, trainable, frozen = split_model(model, stage.trainable_filter())
    batch = random_batch(stage, config, _DESCRIPTIONS.value, _CANDIDATES.value, text_length(config))
    run_config = base_config()
    if train:
        tx = optim.build_optimizer(run_config.optimizer, trainable, steps_per_epoch=1000)
        state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
        step = jax.jit(make_train_step(spec, stage, run_config.loss, tx, seed=0), donate_argnums=(0,))
        start = time.perf_counter()
        traced = step.trace(state, batch)
        compiled = traced.lower().compile()
        compile_s = time.perf_counter() - start
        holder = [state]

        def call() -> Any:
            holder[0], metrics = compiled(holder[0], batch)
            return metrics

    else:
        predict = jax.jit(make_predict_step(spec, stage))
        start = time.perf_counter()
        traced = predict.trace(trainable, frozen, batch)
        compiled = traced.lower().compile()
        compile_s = time.perf_counter() - start

        def call() -> Any:
            return compiled(trainable, frozen, batch)

    (times,) = interleaved_times([call], _RUNS.value, _WARMUP.value)
    return times, compile_s, step_figures(traced, compiled)


def step_row(train: bool) -> dict[str, Any]:
    stage = stages.get(_STAGE.value)
    if train and not stage.trains:
        raise app.UsageError(f"stage {stage.name!r} does not train: use --measure=eval")
    if not train and not stage.evaluates:
        raise app.UsageError(f"stage {stage.name!r} has no candidate scores: use --measure=train")
    times, compile_s, figures = measure_step(stage, PRESETS[_PRESET.value], train)
    step_s = hardware.spread(times)
    descriptions = _DESCRIPTIONS.value
    images = descriptions if stage.data == "captions" else descriptions * _CANDIDATES.value
    peak, peak_source = hardware.peak_tflops(_DTYPE.value)
    flops = figures["flops_per_step"]
    achieved = flops / step_s["median"] / 1e12 if flops else None
    memory, memory_source = hardware.peak_memory_bytes()
    return {
        "framework": "jax",
        "measure": "train" if train else "eval",
        "stage": stage.name,
        "images_per_s": round(images / step_s["median"], 3),
        "descriptions_per_s": round(descriptions / step_s["median"], 3),
        "step_s": step_s,
        "compile_s": round(compile_s, 2),
        **figures,
        "tflops_per_s": round(achieved, 3) if achieved else None,
        "peak_tflops": round(peak, 3),
        "peak_source": peak_source,
        "mfu": round(achieved / peak, 4) if achieved else None,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "remat": _REMAT.value,
    }


def adapter_rows(config: ContextBLIPConfig) -> list[dict[str, Any]]:
    """Zero-shot scoring with and without the adapter on the same weights and inputs, and the overhead."""
    dtype = jnp.dtype(_DTYPE.value)
    model = ContextBLIP(config, dtype=dtype, rngs=nnx.Rngs(0))
    batch = random_batch(stages.get("zeroshot"), config, _DESCRIPTIONS.value, _CANDIDATES.value, text_length(config))
    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]

    @nnx.jit
    def with_adapter(model: ContextBLIP) -> jax.Array:
        return model.zero_shot_scores(images, ids, mask)

    @nnx.jit
    def without_adapter(model: ContextBLIP) -> jax.Array:
        flat = images.reshape(-1, *images.shape[2:])
        repeat = _CANDIDATES.value
        logits = model.blip.itm_logits_from_features(
            model.blip.image_features(flat), jnp.repeat(ids, repeat, 0), jnp.repeat(mask, repeat, 0)
        )
        return jax.nn.softmax(logits, axis=-1)[:, 1].reshape(_DESCRIPTIONS.value, repeat)

    timed = interleaved_times([lambda: with_adapter(model), lambda: without_adapter(model)], _RUNS.value, _WARMUP.value)
    rows = []
    for adapter, times in zip((True, False), timed, strict=True):
        step_s = hardware.spread(times)
        rows.append(
            {
                "framework": "jax",
                "measure": "adapter",
                "adapter": adapter,
                "step_s": step_s,
                "images_per_s": round(_DESCRIPTIONS.value * _CANDIDATES.value / step_s["median"], 3),
            }
        )
    overhead = rows[0]["step_s"]["median"] / rows[1]["step_s"]["median"] - 1.0
    rows.append({"framework": "jax", "measure": "adapter_overhead", "relative": round(overhead, 4)})
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common = {
        "preset": _PRESET.value,
        "dtype": _DTYPE.value,
        "descriptions": _DESCRIPTIONS.value,
        "candidates": _CANDIDATES.value,
        "text_length": text_length(PRESETS[_PRESET.value]),
        "runs": _RUNS.value,
        "device": hardware.device_name(),
        "threads": os.cpu_count(),
    }
    if _MEASURE.value == "adapter":
        rows = adapter_rows(PRESETS[_PRESET.value])
    else:
        rows = [step_row(train=_MEASURE.value == "train")]
    for row in rows:
        print(json.dumps({**row, **common}), flush=True)


if __name__ == "__main__":
    app.run(main)
