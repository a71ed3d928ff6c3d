"""`python -m contextblip_jax.benchmark`: throughput of the project's own jitted steps, one JSON object per line.

    python -m contextblip_jax.benchmark --measure=train --stage=finetune --preset=base --descriptions=2 \
        --compare=torch,torch_compile
    python -m contextblip_jax.benchmark --measure=eval --stage=zeroshot --preset=base --compare=torch
    python -m contextblip_jax.benchmark --measure=adapter --preset=base
    python -m contextblip_jax.benchmark --measure=train --preset=small --sweep=descriptions --compare=torch --out=S
    python -m contextblip_jax.benchmark --measure=eval --stage=zeroshot --root=DIR --split=valid --limit_sets=12 \
        --descriptions=36 --compare=torch
    python -m contextblip_jax.benchmark --measure=train --stage=context --root=DIR --split=train --limit_sets=8 \
        --descriptions=4 --compare=uncached

Measurements:
- `train`: one optimizer step of `--stage` (forward, backward and the update of the stage's trainable parameters),
  built by `step.make_train_step`, the function the trainer runs, with the stage's optimizer defaults.
- `eval`: the stage's candidate scores for `--descriptions` x `--candidates` images (`step.make_predict_step`).
- `adapter`: zero-shot scoring with the adapter and without it (plain BLIP on the same inputs), and the overhead.

`--compare=torch,torch_compile` adds the same computation in PyTorch (`torch_steps.py`; stage 2a training and
zero-shot scoring), eager and under `torch.compile`, holding the JAX model's weights and fed the same batch.
Before anything is timed, the first loss (train) or scores (eval) of each side must agree with JAX's within 1e-4
(relative for the loss, absolute for the scores) in float32, and a train step's parameters after that first
update (the adapter, the head, the first ViT block and text layer) within 1% of the update's size, else the
benchmark stops; in bfloat16 the differences are reported (`difference_vs_jax`, `update_difference_vs_jax`).
The frameworks are then timed in turns (A, B, C, A, B, C, ...), so that drift in the
machine's load hits all alike.

With `--root` (an ImageCoDe folder) a whole pass is timed instead of one step (`passes.py`): the evaluator's
pass over the first `--limit_sets` sets of `--split` (`--measure=eval`), or one training epoch over them
(`--measure=train`), built from `configs/imagecode.py` with `--protocol` as `evaluate` and `train` build it, at
`--descriptions` per batch: grouped by set or not (`--group_by_set`, default the protocol's), stage 2b on cached
features or not (`--cache_features`, default the protocol's; the cache's build time is reported apart), with
`--set_slots` sets per grouped batch (0: the config's rule, `grouped.Layout.of`). The rows
give `descriptions_per_s`, `images_encoded_per_description` and `flops_per_description`. `--compare=torch` adds
the authors' way in PyTorch (per-description batches, each description's 10 images decoded and encoded), whose
scores must match JAX's for every description after the first round of passes, else nothing is reported;
`--compare=uncached` adds stage 2b's epoch without the cache. Training passes follow `--warmup` untimed epochs
(a run trains many in one process, and its first is slower); an evaluation pass is timed from its first call, as
`evaluate` makes one.

`--profile=DIR` traces one more JAX call into DIR and adds a row of time per kind of XLA operation
(`profile.py`). `--input_pipeline` adds a row for the grain pipeline at the step's batch shape (`inputs.py`).
`--sweep=descriptions` (1, 2, 4, ... up to `--sweep_max`) and `--sweep=devices` (simulated host devices, the same
descriptions per device) run each point in its own process and write `sweep_<kind>.jsonl` and `sweep_<kind>.png`
to `--out` (`sweep.py`).

Each row holds the median, min and max wall time of `--runs` calls after `--warmup` ones, the compile time apart
(JAX: XLA's compilation; torch_compile: its first call; eager: 0), XLA's FLOP count of the step (the same count
serves the torch rows), the achieved TFLOP/s and MFU against the device's peak (`hardware.py`; on a CPU the
better of JAX's and, when PyTorch runs, PyTorch's 2048^3 float32 matmul in the same process), the memory figures
and `ratio_vs_torch` (images/s over PyTorch eager's) on the JAX row. Weights and inputs are random. The process
keeps freed host memory for reuse, as the trainer does (`hostmem.py`), for all frameworks alike. On a CPU, run
it on an otherwise idle machine: PyTorch's OpenMP threads spin while they wait, and on shared cores that
slows a small model's step by orders of magnitude.

Imports: its own package (`benchmark`), `cli`, `compile`, `models`, `stages`, `training`; a command (it defines
flags), so no module imports it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import app, flags, logging

from contextblip_jax import cli, stages
from contextblip_jax.benchmark import passes, plots, profile, sweep
from contextblip_jax.benchmark.inputs import input_row
from contextblip_jax.benchmark.jax_steps import (
    PRESETS,
    Prepared,
    Setup,
    adapter_times,
    interleaved_times,
    prepare,
    random_batch,
)
from contextblip_jax.compile import hardware
from contextblip_jax.models.contextblip import REMAT_TOWERS
from contextblip_jax.models.layers import ATTENTION_IMPLEMENTATIONS
from contextblip_jax.training import hostmem

FRAMEWORKS = ("torch", "torch_compile")

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
_ATTENTION = flags.DEFINE_enum(
    "attention", "einsum", list(ATTENTION_IMPLEMENTATIONS), "Self-attention of the JAX towers (models/layers.py)."
)
_COMPARE = flags.DEFINE_list("compare", [], f"PyTorch variants timed beside JAX, from {FRAMEWORKS}.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed calls; median, min and max are reported.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
_INPUT_PIPELINE = flags.DEFINE_bool(
    "input_pipeline", False, "Add a row: the grain pipeline's images/s at the step's batch shape (inputs.py)."
)
_INPUT_WORKERS = flags.DEFINE_integer("input_workers", 0, "Grain worker processes of the input row.")
_SWEEP = flags.DEFINE_enum(
    "sweep", None, list(sweep.KINDS), "Run the measurement at 1, 2, 4, ... descriptions or devices (sweep.py)."
)
_SWEEP_MAX = flags.DEFINE_integer("sweep_max", 64, "Largest descriptions (or devices) a sweep tries.")
_SWEEP_POINT_S = flags.DEFINE_float("sweep_point_s", 1800.0, "Time limit of one sweep point; past it the sweep stops.")
_PROFILE = flags.DEFINE_string(
    "profile", "", "Folder: trace one more JAX call there and add a row of time per XLA operation (profile.py)."
)
_ROOT = flags.DEFINE_string("root", "", "ImageCoDe folder: time a whole pass over its sets instead of one step.")
_SPLIT = flags.DEFINE_enum("split", "valid", ["train", "valid"], "With --root: the split whose sets are read.")
_LIMIT_SETS = flags.DEFINE_integer("limit_sets", 12, "With --root: the split's first N sets make the pass.")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "improved", ["authors", "improved"], "With --root: the protocol of configs/imagecode.py."
)
_GROUP_BY_SET = flags.DEFINE_bool(
    "group_by_set", None, "With --root: batches of whole sets (data/eval.group_by_set); default: the protocol's."
)
_CACHE_FEATURES = flags.DEFINE_bool(
    "cache_features", None, "With --root, stage 2b: train on cached features; default: the protocol's."
)
_SET_SLOTS = flags.DEFINE_integer(
    "set_slots", 0, "With --root, grouped: sets per batch (eval/data.set_slots; 0: the config's rule)."
)
_OUT = flags.DEFINE_string("out", "", "Sweeps: folder for sweep_<kind>.jsonl and sweep_<kind>.png (default: .).")


UPDATE_TOLERANCE = 1e-2
"""The largest gap between two sides' parameters after one update, over the update's own size (float32)."""


def agreement(
    name: str, jax_side: Prepared, other: Prepared, setup: Setup, params: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """The differences between two sides' first outputs and, for a train step given the starting `params`, their
    parameters after that first update (`torch_steps.update_difference`); in float32 a first output over 1e-4
    apart, or an update over `UPDATE_TOLERANCE` of its size apart, stops the benchmark."""
    train = setup.train
    if train:
        difference = float(abs(other.first - jax_side.first) / max(abs(float(jax_side.first)), 1.0))
    else:
        difference = float(np.max(np.abs(other.first - jax_side.first)))
    if setup.dtype == "float32" and difference > 1e-4:
        raise SystemExit(
            f"{name} computes something else than JAX: first {'loss' if train else 'scores'} {other.first} "
            f"against {jax_side.first} (difference {difference:.3g} > 1e-4); nothing was timed"
        )
    found = {"first": difference}
    if train and params and jax_side.updated is not None and other.updated is not None:
        from contextblip_jax.benchmark import torch_steps

        found["update"] = torch_steps.update_difference(setup.config, params, jax_side.updated, other.updated)
        if setup.dtype == "float32" and found["update"] > UPDATE_TOLERANCE:
            raise SystemExit(
                f"{name} updates the parameters otherwise than JAX: after one step a tensor differs by "
                f"{found['update']:.3g} of its update (> {UPDATE_TOLERANCE}); nothing was timed"
            )
    return found


def step_rows(setup: Setup) -> list[dict[str, Any]]:
    stage = setup.stage_row
    if setup.train and not stage.trains:
        raise app.UsageError(f"stage {stage.name!r} does not train: use --measure=eval")
    if not setup.train and not stage.evaluates:
        raise app.UsageError(f"stage {stage.name!r} has no candidate scores: use --measure=train")
    unknown = sorted(set(_COMPARE.value) - set(FRAMEWORKS))
    if unknown:
        raise app.UsageError(f"--compare takes {FRAMEWORKS}, got {unknown}")
    batch = random_batch(setup)
    jax_side, params = prepare(setup, batch, keep_params=bool(_COMPARE.value))
    sides: dict[str, Prepared] = {"jax": jax_side}
    differences: dict[str, dict[str, float]] = {}
    shared = None  # the eager and the compiled side run one torch model (torch_steps.TorchModel)
    for name in _COMPARE.value:
        from contextblip_jax.benchmark import torch_steps  # torch is a development dependency

        sides[name], shared = torch_steps.prepare(setup, batch, params, name == "torch_compile", shared)
        differences[name] = agreement(name, jax_side, sides[name], setup, params)
    del params
    logging.info("timing %s in turns: %d warm-up and %d timed calls each", list(sides), _WARMUP.value, _RUNS.value)
    times = interleaved_times([side.call for side in sides.values()], _RUNS.value, _WARMUP.value)
    peak, peak_source = hardware.peak_tflops(setup.dtype)
    if len(sides) > 1 and peak_source.startswith("measured"):  # a CPU with PyTorch: the better matmul counts
        torch_peak = torch_steps.measured_matmul_tflops(setup.dtype)
        logging.info("2048^3 matmul: JAX %.4f, PyTorch %.4f TFLOP/s", peak, torch_peak)
        if torch_peak > peak:
            peak, peak_source = torch_peak, f"{peak_source}, PyTorch's (JAX's: {peak:.4f} TFLOP/s)"
        else:
            peak_source = f"{peak_source}, JAX's (PyTorch's: {torch_peak:.4f} TFLOP/s)"
    memory, memory_source = hardware.peak_memory_bytes()
    if memory_source == "host peak RSS" and len(sides) > 1:
        memory_source += " (all frameworks of the run)"
    torch_memory = torch_steps.peak_memory_bytes() if len(sides) > 1 else None
    flops = jax_side.figures["flops_per_step"]
    rows = []
    for (name, side), timed in zip(sides.items(), times, strict=True):
        step_s = hardware.spread(timed)
        achieved = flops / step_s["median"] / 1e12 if flops else None
        rows.append(
            {
                "framework": name,
                "measure": "train" if setup.train else "eval",
                "stage": stage.name,
                "images_per_s": round(setup.images / step_s["median"], 3),
                "descriptions_per_s": round(setup.descriptions / step_s["median"], 3),
                "step_s": step_s,
                "compile_s": round(side.compile_s, 2),
                "flops_per_step": flops,
                "estimated_memory_bytes": side.figures.get("estimated_memory_bytes"),
                "tflops_per_s": round(achieved, 3) if achieved else None,
                "peak_tflops": round(peak, 3),
                "peak_source": peak_source,
                "mfu": round(achieved / peak, 4) if achieved else None,
                **peak_memory_fields(name, (memory, memory_source), torch_memory),
                "difference_vs_jax": differences.get(name, {}).get("first"),
                "update_difference_vs_jax": differences.get(name, {}).get("update"),
                "remat": list(setup.remat),
                "attention": setup.attention if name == "jax" else None,
            }
        )
    rows[0]["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    if "torch" in sides:
        rows[0]["ratio_vs_torch"] = round(rows[0]["images_per_s"] / rows[1]["images_per_s"], 3)
    if _PROFILE.value:
        rows.append(profile.profile_row(jax_side.call, _PROFILE.value))
    return rows


def pass_rows(setup: Setup) -> list[dict[str, Any]]:
    """`--root`: the rows of whole passes (`passes.py`)."""
    if _MEASURE.value == "adapter":
        raise app.UsageError("--root times a pass of --measure=eval or --measure=train")
    pass_setup = passes.PassSetup(
        step=setup,
        root=_ROOT.value,
        split=_SPLIT.value,
        limit_sets=_LIMIT_SETS.value,
        protocol=_PROTOCOL.value,
        group_by_set=_GROUP_BY_SET.value,
        cache_features=_CACHE_FEATURES.value,
        set_slots=_SET_SLOTS.value,
    )
    try:
        passes.check_compare(setup, tuple(_COMPARE.value))
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    return passes.pass_rows(pass_setup, tuple(_COMPARE.value), _RUNS.value, _WARMUP.value)


def peak_memory_fields(
    framework: str, jax_memory: tuple[int, str], torch_memory: tuple[int, str] | None
) -> dict[str, Any]:
    """A row's peak memory: PyTorch's own allocator for a torch row on a GPU, else JAX's figure (the device
    allocator's peak, or on a CPU the process's peak RSS, which every framework of the run shares)."""
    memory, source = torch_memory if framework != "jax" and torch_memory is not None else jax_memory
    return {"peak_memory_bytes": memory, "peak_memory_source": source}


def adapter_rows(setup: Setup) -> list[dict[str, Any]]:
    rows = []
    for adapter, timed in zip((True, False), adapter_times(setup, _RUNS.value, _WARMUP.value), strict=True):
        step_s = hardware.spread(timed)
        images_per_s = round(setup.descriptions * setup.candidates / step_s["median"], 3)
        row = {"framework": "jax", "measure": "adapter", "adapter": adapter, "step_s": step_s}
        rows.append({**row, "images_per_s": images_per_s})
    overhead = rows[0]["step_s"]["median"] / rows[1]["step_s"]["median"] - 1.0
    rows.append({"framework": "jax", "measure": "adapter_overhead", "relative": round(overhead, 4)})
    return rows


def point_flags() -> list[str]:
    """This run's measurement flags, for the processes of a sweep (which sets `--descriptions` itself); a devices
    sweep measures JAX alone."""
    holders = [_MEASURE, _STAGE, _PRESET, _CANDIDATES, _TEXT_LENGTH, _DTYPE, _REMAT, _ATTENTION, _RUNS, _WARMUP]
    holders += [_INPUT_PIPELINE, _INPUT_WORKERS] + ([_COMPARE] if _SWEEP.value == "descriptions" else [])
    return [holder.serialize() for holder in holders]


def run_sweep() -> None:
    """The points of `--sweep`, printed as they come, then written to `--out` as JSON lines and a PNG plot."""
    kind = _SWEEP.value
    if kind == "devices" and _COMPARE.value:
        logging.warning("--sweep=devices measures JAX alone: --compare=%s is ignored", ",".join(_COMPARE.value))
    values = sweep.doubling(_SWEEP_MAX.value)
    rows = sweep.sweep(kind, point_flags(), values, _DESCRIPTIONS.value, _SWEEP_POINT_S.value)
    for row in rows:
        print(json.dumps(row), flush=True)
    folder = _OUT.value or "."
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"sweep_{kind}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    plots.plot_sweep(rows, kind, os.path.join(folder, f"sweep_{kind}.png"))
    logging.info("sweep written to %s (sweep_%s.jsonl, sweep_%s.png)", folder, kind, kind)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _SWEEP.value:
        run_sweep()
        return
    if _PROFILE.value:
        profile.enable_op_events()  # before the backend starts
    hostmem.keep_freed_memory()  # as the trainer does; the setting holds for every framework in the process
    setup = Setup(
        preset=_PRESET.value,
        stage=_STAGE.value,
        train=_MEASURE.value == "train",
        dtype=_DTYPE.value,
        descriptions=_DESCRIPTIONS.value,
        candidates=_CANDIDATES.value,
        text_length=_TEXT_LENGTH.value,
        remat=tuple(_REMAT.value),
        attention=_ATTENTION.value,
    )
    common = {
        "preset": setup.preset,
        "dtype": setup.dtype,
        "descriptions": setup.descriptions,
        "candidates": setup.candidates,
        "text_length": setup.length,
        "runs": _RUNS.value,
        "device": hardware.device_name(),
        "threads": os.cpu_count(),
    }
    if _INPUT_PIPELINE.value and setup.stage_row.data != "imagecode":
        raise app.UsageError("--input_pipeline measures the ImageCoDe pipeline: choose an ImageCoDe stage")
    if _ROOT.value:
        rows = pass_rows(setup)
    elif _MEASURE.value == "adapter":
        rows = adapter_rows(setup)
    else:
        rows = step_rows(setup)
    if _INPUT_PIPELINE.value:
        batches = max(3, 40 // setup.descriptions)
        image_size = setup.config.blip.vision.image_size
        rows.append(input_row(setup.descriptions, image_size, _INPUT_WORKERS.value, batches))
    for row in rows:  # a pass row's `descriptions` counts the pass's; its batch holds `batch_size`
        print(json.dumps({**row, **common, **row}), flush=True)


def run() -> None:
    """`contextblip-benchmark`: the same as `python -m contextblip_jax.benchmark`."""
    cli.run(main)


if __name__ == "__main__":
    run()
