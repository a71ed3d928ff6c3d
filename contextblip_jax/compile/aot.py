"""`python -m contextblip_jax.train ... --compile_only=TARGET`: will this config compile and fit on that hardware?

The run's own train and predict steps (`programs.build`, as the trainer builds them) are lowered and compiled for
a target this machine does not have (a TPU slice, an NVIDIA node; `targets.py`) without weights or data: the model
is built with `nnx.eval_shape` and the batches are shapes from the config. XLA then reports per-device memory
(arguments, outputs, temporaries, peak) and FLOPs; the compiled HLO shows the collectives sharding inserted.
The figures go to `W/compile.json`; a config whose step does not fit the target's memory raises `DoesNotFit`,
naming the target, its memory, the step's need and what to change.

    report = compile_only(config, workdir, targets.parse("v5e-8"))

Imports: its own package (`compile`), `data`, `models`, `parallel`, `runconfig`, `stages`, `training`.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from contextblip_jax import parallel, runconfig, stages
from contextblip_jax.compile import hardware
from contextblip_jax.compile.targets import Target, devices, host_memory
from contextblip_jax.data import grouped
from contextblip_jax.data.imagecode import NUM_CANDIDATES
from contextblip_jax.models import axes
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.stages import FEATURE_FIELDS, FEATURES, SET_INDEX, Stage
from contextblip_jax.training import programs
from contextblip_jax.training.step import TrainState

REPORT_FILE = "compile.json"

GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
"""Deviceless GPU compilation of the base model's step fails inside XLA's Triton GEMM tiling ("Couldn't find output
tile sizes that satisfy ... dot bf16[15760,768]"); the cuBLAS path compiles. The memory figures are those of the
cuBLAS program, which is the one a real GPU falls back to as well."""

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class DoesNotFit(ValueError):
    """The config's step needs more memory per device than the target has; `report` holds what was compiled."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def use_cpu_host() -> None:
    """Compiling for another target needs no accelerator backend here; without this, an installed CUDA plugin
    (the `accelerators` extra) and libtpu try to start one, print tracebacks and fall back to the CPU.
    Must run before anything touches jax devices."""
    jax.config.update("jax_platforms", "cpu")


def abstract_model(config: ml_collections.ConfigDict) -> ContextBLIP:
    """The config's architecture, dtype and seed as shapes only: no weights are made or read (`config.init` is
    not opened; a checkpoint's architecture must match `config.model`, as resuming already requires)."""
    model_config = runconfig.model_config(config)
    dtype = jnp.dtype(config.dtype)
    return nnx.eval_shape(lambda: ContextBLIP(model_config, dtype=dtype, rngs=nnx.Rngs(config.seed)))


def batch_shapes(
    config: ml_collections.ConfigDict, stage: Stage, train: bool, shards: int = 1
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the input pipeline delivers (`data/transforms.py`): the stage's fields for training; every
    field, `example_id` included, for evaluation, whose batches reach the predict step whole.

    Batches grouped by set (`data.group_by_set` in training, `eval.group_by_set` in evaluation; `data/grouped.py`)
    hold each set slot's images once and a `set_index`, laid out for `shards` data shards (and, in training,
    `grad_accum_steps` micro-batches) as the run lays them out; stage 2b on cached features
    (`context.cache_features`) trains on the vectors instead of images."""
    n = config.data.batch_size if train else config.eval.batch_size
    size, length = config.data.image_size, config.data.max_text_length
    per_description = () if stage.data == "captions" else (NUM_CANDIDATES,)
    fields = {
        "images": ((n, *per_description, size, size, 3), jnp.float32),
        "input_ids": ((n, length), jnp.int32),
        "attention_mask": ((n, length), jnp.int32),
        "target": ((n,), jnp.int32),
        "is_video": ((n,), jnp.bool_),
        "example_id": ((n,), jnp.int32),
    }
    names = stage.batch_fields if train else (*stage.batch_fields, "example_id")
    if train and stage.features and config.context.cache_features:
        width = config.model.blip.text.width
        dtype = jnp.bfloat16 if config.context.cache_dtype == "bfloat16" else jnp.float32
        fields[FEATURES] = ((n, NUM_CANDIDATES, width), dtype)
        names = FEATURE_FIELDS
    elif layout := set_layout(config, stage, train, shards):
        fields["images"] = ((layout.groups * layout.set_slots, NUM_CANDIDATES, size, size, 3), jnp.float32)
        fields[SET_INDEX] = ((layout.groups, layout.description_slots), jnp.int32)
        names = (*names, SET_INDEX)
    return {name: jax.ShapeDtypeStruct(*fields[name]) for name in names}


def set_layout(config: ml_collections.ConfigDict, stage: Stage, train: bool, shards: int) -> grouped.Layout | None:
    """The slots of a batch grouped by set, as the trainer (`training/inputs.py`) or the evaluators lay them out;
    None for per-description batches."""
    if stage.data != "imagecode":
        return None
    if train and config.data.group_by_set:
        groups = shards * config.grad_accum_steps
        return grouped.Layout.of(config.data.batch_size, groups, config.data.set_slots, section="data")
    if not train and config.eval.group_by_set:
        return grouped.Layout.of(config.eval.batch_size, shards, config.eval.set_slots)
    return None


def images_per_step(config: ml_collections.ConfigDict, stage: Stage, train: bool, shards: int) -> int:
    """The images one step encodes: 10 per set slot when grouped, 10 per description otherwise (none from
    cached features), one per caption."""
    if stage.data == "captions":
        return config.data.batch_size
    if train and stage.features and config.context.cache_features:
        return 0
    layout = set_layout(config, stage, train, shards)
    if layout is not None:
        return NUM_CANDIDATES * layout.groups * layout.set_slots
    return NUM_CANDIDATES * (config.data.batch_size if train else config.eval.batch_size)


def target_mesh(config: ml_collections.ConfigDict, target_devices: list) -> jax.sharding.Mesh:
    """The mesh the run would build on those devices (`parallel.make_mesh`: interconnect-aware order). Several
    TPU slices are not a torus jax.make_mesh can order; there the devices go in slice order, so that the
    outermost axis (data) crosses slices."""
    if len({getattr(d, "slice_index", 0) for d in target_devices}) == 1:
        return parallel.make_mesh(config.mesh, devices=target_devices)
    logging.warning(
        "several slices: devices in slice order; parallel.make_mesh (jax.make_mesh) cannot order a multi-slice "
        "device set, so a real multi-slice run needs a hybrid (slice-aware) mesh there as well"
    )
    sizes = parallel.resolve_mesh_shape(config.mesh, len(target_devices))
    ordered = sorted(target_devices, key=lambda d: (d.slice_index, d.id))
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes.MESH_AXES)
    return jax.sharding.Mesh(np.array(ordered).reshape(sizes), axes.MESH_AXES, axis_types=axis_types)


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective instructions in compiled HLO text (an async pair `-start`/`-done` counts once)."""
    return {name: len(re.findall(rf"\s{name}(?:-start)?\(", hlo)) for name in COLLECTIVES}


def parse_bytes(text: str) -> int:
    """`31.80G` (XLA's binary units) -> bytes."""
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text).groups()
    return int(float(number) * _UNITS[unit])


def exhausted_need(message: str) -> tuple[int | None, int | None]:
    """(bytes needed, bytes available) from XLA's RESOURCE_EXHAUSTED message, None where it gives none."""
    size = r"([\d.]+[KMGT]i?B?)"
    patterns = (
        rf"required for [^(]*\({size}\)|Used {size} of|need(?:s|ed)? {size}",
        rf"available \w+ \({size}\)|of {size} hbm",
    )
    found = []
    for pattern in patterns:
        match = re.search(pattern, message)
        text = next((group for group in match.groups() if group), None) if match else None
        found.append(None if text is None else parse_bytes(text))
    return found[0], found[1]


def _compile_step(
    jitted: Any, args: tuple, target: Target, images: int, descriptions: int, counted: Any = None
) -> dict[str, Any]:
    """Lowers and compiles one jitted step for the target's devices; its memory, FLOPs, collectives and times.

    FLOPs are counted on `counted` (default: `jitted`), the same step with its towers unrolled when `jitted` scans
    them: XLA's cost analysis counts a loop's body once, whatever its trip count."""
    start = time.perf_counter()
    lowered = jitted.trace(*args).lower()
    lowered_at = time.perf_counter()
    options = GPU_COMPILER_OPTIONS if target.kind == "gpu" else None
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        needed, available = exhausted_need(str(error))
        logging.warning("XLA ran out of memory compiling for %s: %s", target.label, str(error).splitlines()[0])
        return {
            "lowering_s": round(lowered_at - start, 2),
            "compile_s": round(time.perf_counter() - lowered_at, 2),
            "error": str(error).splitlines()[0][:2000],
            "needed_bytes": needed,
            "xla_available_bytes": available,
        }
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    section: dict[str, Any] = {
        "lowering_s": round(lowered_at - start, 2),
        "compile_s": round(compiled_at - lowered_at, 2),
        "images_per_step": images,
        "descriptions_per_step": descriptions,
    }
    if memory is None:
        section["peak_bytes"] = None
    elif target.kind == "cpu":
        section.update(
            argument_bytes=memory.argument_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
            peak_bytes=None,
            peak_source="none: XLA:CPU's peak is its arguments, and its temporaries add up every buffer without "
            "reuse (an upper bound); the memory check is skipped on cpu",
        )
    else:
        section.update(
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            alias_bytes=memory.alias_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
            generated_code_bytes=memory.generated_code_size_in_bytes,
        )
        peak = getattr(memory, "peak_memory_in_bytes", 0)
        section["peak_source"] = "XLA peak_memory_in_bytes" if peak else "arguments + outputs - aliased + temporaries"
        section["peak_bytes"] = peak or (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes
        )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    section["flops_per_device_compiled"] = (cost or {}).get("flops") if counted is None else None
    section["bytes_accessed_per_device_compiled"] = (cost or {}).get("bytes accessed") if counted is None else None
    flops = hardware.program_flops((counted or jitted).__wrapped__, *args)
    section["flops_per_step"] = flops
    section["flops_per_image"] = flops / images if flops and images else None
    section["flops_per_description"] = flops / descriptions if flops and descriptions else None
    section["flops_source"] = "XLA:CPU cost analysis of the unpartitioned step (the program's own count)"
    if counted is not None:
        section["flops_source"] += (
            ", counted with the towers unrolled (a scanned body counts once; no per-device count for the same reason)"
        )
    section["collectives"] = count_collectives(compiled.as_text())
    return section


def _suggestions(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, step: str) -> str:
    sizes = tuple(mesh.shape[axis] for axis in axes.MESH_AXES)
    if step == "eval":
        return f"lower --config.eval.batch_size (now {config.eval.batch_size}) or shard over fsdp (below)"
    fsdp = f"(1,{sizes[0] * sizes[1]},{sizes[2]})"
    return (
        f"lower --config.data.batch_size (now {config.data.batch_size}); shard parameters and optimizer state over "
        f"the fsdp mesh axis, e.g. --config.mesh='{fsdp}' (now {sizes} as (data, fsdp, tensor)); recompute blocks "
        f'in the backward pass with --config.remat=\'("vision","text")\' (now {tuple(config.remat)}); or split '
        f"the batch into micro-batches with --config.grad_accum_steps=N (now {config.grad_accum_steps})"
    )


def _misfit(report: dict, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> str | None:
    """The message naming target, memory, need and remedies, for the first step that does not fit; else None."""
    limit = report["memory_per_device_bytes"]
    for step in ("train", "eval"):
        section = report.get(step)
        if not section:
            continue
        if "error" in section:
            need = section["needed_bytes"]
            needs = f"at least {_gib(need)} per device (XLA: {section['error']})" if need else section["error"]
        elif limit and section["peak_bytes"] and section["peak_bytes"] > limit:
            needs = f"{_gib(section['peak_bytes'])} per device at its peak"
        else:
            continue
        return (
            f"the {config.stage} {step} step does not fit {report['target']}: each of its {report['device_count']} "
            f"{report['device_kind']} devices has {_gib(limit)}, and the step needs {needs}. To fit it, "
            f"{_suggestions(config, mesh, step)}."
        )
    return None


def _scaled(value: float, base: int, units: tuple[str, ...]) -> str:
    """`1536, 1024, (B, KiB, ...)` -> `1.50 KiB`."""
    power = 0
    while abs(value) >= base and power < len(units) - 1:
        value, power = value / base, power + 1
    return f"{value:.2f} {units[power]}"


def _gib(value: int | None) -> str:
    return "unknown memory" if value is None else f"{value / (1 << 30):.2f} GiB"


def compile_only(
    config: ml_collections.ConfigDict, workdir: str, target: Target, evaluate: bool = True
) -> dict[str, Any]:
    """Compiles the run's train step (and predict step, where the stage has one and `evaluate`) for `target`;
    writes and returns the report. Raises `DoesNotFit` (after writing the report) when a step needs more memory
    than a device has.

    The learning-rate schedule's epoch length is `config.optimizer.steps_per_epoch` (1 when 0: no data is read to
    count examples); it only changes constants, not the program's shape or memory.
    """
    config = runconfig.prepare(config, data=False, weights=False)
    stage = stages.get(config.stage)
    if not stage.trains:
        raise ValueError(f"the {stage.name} stage does not train: nothing to compile for a training run")
    target_devices = list(devices(target))
    mesh = target_mesh(config, target_devices)
    try:
        parallel.check_batch(config.data.batch_size // config.grad_accum_steps, mesh)
        if stage.evaluates and evaluate:
            parallel.check_batch(config.eval.batch_size, mesh)
    except ValueError as error:
        raise ValueError(f"{target.label}: {error} (data.batch_size / grad_accum_steps and eval.batch_size)") from None
    built = programs.build(config, stage, abstract_model(config), mesh, config.optimizer.steps_per_epoch or 1)
    scanned = config.scan_layers
    counted = None  # what FLOPs are counted on: the same steps unrolled, when the towers are scanned
    if scanned:
        unrolled = config.copy_and_resolve_references()
        unrolled.scan_layers = False
        counted = programs.build(unrolled, stage, abstract_model(unrolled), mesh, config.optimizer.steps_per_epoch or 1)
    shards = parallel.batch_shards(mesh)
    memory = target.memory_per_device or host_memory() // len(target_devices)
    report: dict[str, Any] = {
        "target": target.label,
        "platform": target_devices[0].platform,
        "device_kind": target_devices[0].device_kind,
        "device_count": len(target_devices),
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "memory_per_device_bytes": memory,
        "stage": stage.name,
        "dtype": config.dtype,
        "remat": list(config.remat),
        "remat_policy": config.remat_policy,
        "scan_layers": scanned,
        "grad_accum_steps": config.grad_accum_steps,
        "batch_size": config.data.batch_size,
    }
    logging.info("compiling the %s train step for %s (mesh %s)", stage.name, target.label, report["mesh"])
    abstract_state = jax.eval_shape(
        lambda t, f: TrainState(jnp.zeros((), jnp.int32), t, f, built.tx.init(t)),
        built.trainable,
        built.frozen,
    )
    train_batch = batch_shapes(config, stage, train=True, shards=shards)
    report["train"] = _compile_step(
        built.train_step,
        (abstract_state, train_batch),
        target,
        images_per_step(config, stage, True, shards),
        config.data.batch_size,
        counted and counted.train_step,
    )
    report["eval"] = None
    if built.predict is not None and evaluate and "error" not in report["train"]:
        report["eval_batch_size"] = config.eval.batch_size
        logging.info("compiling the %s predict step for %s", stage.name, target.label)
        args = (built.trainable, built.frozen, batch_shapes(config, stage, train=False, shards=shards))
        images = images_per_step(config, stage, False, shards)
        report["eval"] = _compile_step(
            built.predict, args, target, images, config.eval.batch_size, counted and counted.predict
        )
    for step in ("train", "eval"):
        section = report[step] or {}
        if "peak_bytes" in section:
            logging.info(
                "%s step on %s: peak %s of %s per device, %s FLOP per image (%s), lowering %.1f s, compilation %.1f s",
                step,
                target.label,
                _gib(section["peak_bytes"]),
                _gib(memory),
                f"{section['flops_per_image']:.4g}" if section["flops_per_image"] else "unknown",
                section["flops_source"],
                section["lowering_s"],
                section["compile_s"],
            )
    problem = _misfit(report, config, mesh)
    report["fits"] = problem is None
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    if problem:
        raise DoesNotFit(problem, report)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a readable table, one column per compiled step (for the command line)."""
    limit = report["memory_per_device_bytes"]
    steps = [name for name in ("train", "eval") if report.get(name)]

    def cell(section: dict, key: str) -> str:
        if "error" in section and key not in ("lowering_s", "compile_s"):
            return "out of memory" if key == "peak_bytes" else "-"
        value = section.get(key)
        if key == "collectives":
            return " ".join(f"{name}:{count}" for name, count in value.items() if count) or "none"
        if value is None:
            return "n/a (not reported)"
        if key.endswith("_bytes"):
            share = f" ({100 * value / limit:.1f}%)" if key == "peak_bytes" and limit else ""
            return _scaled(value, 1024, ("B", "KiB", "MiB", "GiB", "TiB")) + share
        if key.startswith("flops"):
            return _scaled(value, 1000, ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"))
        return f"{value} s" if key.endswith("_s") else str(value)

    rows = [
        ("lowering", "lowering_s"),
        ("compilation", "compile_s"),
        ("arguments / device", "argument_bytes"),
        ("outputs / device", "output_bytes"),
        ("temporaries / device", "temp_bytes"),
        ("generated code / device", "generated_code_bytes"),
        ("peak / device", "peak_bytes"),
        ("FLOPs / step", "flops_per_step"),
        ("FLOPs / image", "flops_per_image"),
        ("FLOPs / device (compiled)", "flops_per_device_compiled"),
        ("collectives", "collectives"),
    ]
    remat = f"{report['remat']} ({report['remat_policy']})" if report["remat"] else "off"
    head = (
        f"{report['target']}: {report['device_count']} x {report['device_kind']} ({report['platform']}), "
        f"{_gib(limit)} per device, mesh {report['mesh']}; {report['stage']} stage, {report['dtype']}, "
        f"batch {report['batch_size']}, remat {remat}, grad_accum_steps {report['grad_accum_steps']}"
        + (", layers scanned" if report.get("scan_layers") else "")
    )
    lines = [head, f"{'':27}" + "".join(f"{name:>34}" for name in steps)]
    lines += [f"{label:27}" + "".join(f"{cell(report[name], key):>34}" for name in steps) for label, key in rows]
    lines.append("fits" if report["fits"] else "DOES NOT FIT")
    return "\n".join(lines)
