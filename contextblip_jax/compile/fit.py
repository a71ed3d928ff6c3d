"""The largest global batch whose train step fits a target, found by compiling it there (`aot.compile_only`), and
the table of such findings for a list of models, stages and targets:

    python -m contextblip_jax.fit --targets=v5e-8,h100x8 --variants=B/16,L/16 --stages=pretrain,finetune,context \
        --out=fit.jsonl --config.scan_layers=True

Each cell compiles the stage's train step at the paper's batch (rounded up to a multiple of the batch shards),
then searches (`_next_batch`): upwards along the line through the measured peaks (the step's memory grows
almost linearly with the batch), then inside the bracket of fitting and failing batches by regula falsi with
bisection as its safeguard. It stops when the largest fitting and the smallest failing batch are one batch-shard
step apart, or after `--max_compiles`. Each compile of a base model takes minutes on a small CPU machine: scan the
layers (`--config.scan_layers=True`) for anything larger than the tiny model.

Every cell is one JSON line in `--out` (appended, so an interrupted sweep keeps what it found, and a cell already
there is not compiled again: a long table can be filled over several runs) and a row of the
printed table. The step time in the table is an estimate, not a measurement: the larger of the compute-bound
time (FLOPs per step over the chips' data-sheet peak) and the memory-bound time (the bytes XLA reports the device's
program moves, over the chips' data-sheet bandwidth). Scanned towers have no memory-bound time: XLA's cost
analysis counts a loop's body once, so their bytes are not the step's; those rows are marked `compute only`. No
row counts the time of collectives (fsdp all-gathers, gradient all-reduces).

Imports: its own package (`compile`), `models`, `runconfig`, `stages`.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from contextblip_jax import runconfig, stages
from contextblip_jax.compile import aot, hardware, targets
from contextblip_jax.models import axes

PAPER_BATCH = {"pretrain": 1024, "finetune": 36, "context": 36}
"""The authors' global batch per stage (`shared/reference/contextblip.md`): 256 × 4 GPUs for stage 1, 36 after."""


def stage_config(stage: str, variant: str, protocol: str = "authors") -> ml_collections.ConfigDict:
    """The run config of `stage` at `variant` under `protocol`, as `configs/pretrain.py` / `configs/imagecode.py`
    give it (`improved` trains stages 2a and 2b on batches grouped by set, 64 tokens)."""
    if stages.get(stage).data == "captions":
        return runconfig.config_file("pretrain", f"variant={variant},protocol={protocol}")
    return runconfig.config_file("imagecode", f"stage={stage},variant={variant},protocol={protocol}")


def _probe(config: ml_collections.ConfigDict, batch: int, workdir: str, target: targets.Target) -> dict[str, Any]:
    """The train step compiled at `batch`: whether it fits, and its peak (or, when XLA gave up, what it needed)."""
    config = config.copy_and_resolve_references()
    config.data.batch_size = batch
    try:
        report = aot.compile_only(config, os.path.join(workdir, f"batch{batch}"), target, evaluate=False)
    except aot.DoesNotFit as error:
        report = error.report
    finally:
        # jax keeps every compiled program; a base model's TPU program and its HLO hold gigabytes of host memory,
        # so a sweep over several cells would otherwise grow until the kernel ends it
        jax.clear_caches()
        gc.collect()
    train = report["train"]
    used = train.get("peak_bytes") or train.get("needed_bytes")
    logging.info("%s, batch %d: %s (%s)", target.label, batch, "fits" if report["fits"] else "does not fit", used)
    return {"batch": batch, "fits": report["fits"], "bytes": used, "report": report}


def _next_batch(probes: list[dict[str, Any]], unit: int, limit: int) -> tuple[int, str] | None:
    """The next batch to compile, a multiple of `unit` strictly between the largest fitting and the smallest
    failing batch so far, and how it was chosen (`line` or `halve`); None when they are one unit apart.

    Above every probe so far: along the line through the two largest fitting peaks, at most 4 times the largest
    fitting batch (doubling before there are two); below every probe, along the line through the two smallest
    failing peaks, else halving. Inside a bracket: along the line through its two ends (regula falsi), halving it
    instead after two line-placed probes in a row on the same side, so that a curved memory profile cannot stall
    the search."""
    fitting = sorted((p for p in probes if p["fits"]), key=lambda p: p["batch"])
    failing = sorted((p for p in probes if not p["fits"]), key=lambda p: p["batch"])
    low = fitting[-1]["batch"] if fitting else 0
    if not failing:
        guess = _where_line_meets(fitting[-2], fitting[-1], limit) if len(fitting) >= 2 else None
        how = "halve" if guess is None else "line"  # doubling: the halving of the step down, upwards
        guess = 2 * low if guess is None else guess
        return max(min(int(guess // unit) * unit, 4 * low), low + unit), how
    high = failing[0]["batch"]
    if high - low <= unit:
        return None
    if fitting:
        stalled = len(probes) >= 2 and all(p["how"] == "line" for p in probes[-2:])
        stalled = stalled and probes[-1]["fits"] == probes[-2]["fits"]
        guess = None if stalled else _where_line_meets(fitting[-1], failing[0], limit)
    else:
        guess = _where_line_meets(failing[0], failing[1], limit) if len(failing) >= 2 else None
    how = "halve" if guess is None else "line"
    guess = int(((low + high) / 2 if guess is None else guess) // unit) * unit
    return min(max(guess, low + unit), high - unit), how


def _where_line_meets(a: dict[str, Any], b: dict[str, Any], limit: int) -> float | None:
    """The batch at which the line through two probes' (batch, bytes) reaches `limit`; None without a rising line."""
    if not a["bytes"] or not b["bytes"] or a["batch"] == b["batch"]:
        return None
    slope = (b["bytes"] - a["bytes"]) / (b["batch"] - a["batch"])
    return a["batch"] + (limit - a["bytes"]) / slope if slope > 0 else None


def largest_batch(
    config: ml_collections.ConfigDict, workdir: str, target: targets.Target, start: int, max_compiles: int = 6
) -> dict[str, Any]:
    """The largest global batch (a multiple of the batch shards × `grad_accum_steps`) whose train step fits
    `target`, searched from `start` (module docstring); `exact` is false when `max_compiles` ran out first."""
    devices = targets.devices(target)
    mesh = aot.target_mesh(config, list(devices))
    shards = math.prod(dict(mesh.shape)[axis] for axis in axes.BATCH_AXES)
    unit = shards * config.grad_accum_steps
    probes = [{**_probe(config, max(math.ceil(start / unit), 1) * unit, workdir, target), "how": "start"}]
    limit = probes[0]["report"]["memory_per_device_bytes"]
    while len(probes) < max_compiles:
        chosen = _next_batch(probes, unit, limit)
        if chosen is None:
            break
        probes.append({**_probe(config, chosen[0], workdir, target), "how": chosen[1]})
    fitting = [p for p in probes if p["fits"]]
    failing = [p["batch"] for p in probes if not p["fits"]]
    best = max(fitting, key=lambda p: p["batch"], default=None)
    high = min(failing, default=None)
    return {
        "largest_batch": best["batch"] if best else 0,
        "smallest_failing_batch": high,
        "exact": high is not None and high - (best["batch"] if best else 0) <= unit,
        "batch_unit": unit,
        "probes": [{k: p[k] for k in ("batch", "fits", "bytes", "how")} for p in probes],
        "at_largest": best["report"] if best else None,
        "at_start": probes[0]["report"],
    }


def step_time_estimate(report: dict[str, Any]) -> dict[str, Any]:
    """Roofline estimate of one train step on the report's target (module docstring): an estimate only."""
    train, count = report["train"], report["device_count"]
    peak = hardware.spec_peak_for(report["device_kind"], report["dtype"])
    bandwidth = hardware.spec_bandwidth_for(report["device_kind"])
    compute = train["flops_per_step"] / (count * peak * 1e12) if peak and train.get("flops_per_step") else None
    moved = train.get("bytes_accessed_per_device_compiled")
    memory = moved / (bandwidth * 1e9) if moved and bandwidth else None
    known = [t for t in (compute, memory) if t is not None]
    return {
        "compute_bound_s": compute,
        "memory_bound_s": memory,
        "estimate_s": max(known) if known else None,
        "peak_tflops_per_chip": peak,
        "bandwidth_gb_per_s_per_chip": bandwidth,
    }


def cell(
    config: ml_collections.ConfigDict,
    stage: str,
    variant: str,
    target_name: str,
    workdir: str,
    max_compiles: int,
    start_batch: int | None = None,
    protocol: str = "authors",
) -> dict[str, Any]:
    """One table cell (of `config`, built for `protocol`): the peak at the paper batch (or at `start_batch`),
    the largest batch that fits, FLOPs per image, compile time and the step-time estimate at the batch it started
    from."""
    target = targets.parse(target_name)
    found = largest_batch(config, workdir, target, start_batch or PAPER_BATCH[stage], max_compiles)
    start = found["at_start"]
    train = start["train"]
    return {
        "variant": variant,
        "stage": stage,
        "target": target.label,
        "dtype": start["dtype"],
        "mesh": start["mesh"],
        "mesh_config": list(config.mesh),
        "scan_layers": start["scan_layers"],
        "remat": start["remat"],
        "remat_policy": config.remat_policy,
        "paper_batch": PAPER_BATCH[stage],
        "start_batch": start_batch,
        "batch": start["batch_size"],
        "protocol": protocol,
        "group_by_set": bool(config.data.group_by_set) and stages.get(stage).data == "imagecode",
        "images_per_step": train.get("images_per_step"),
        "descriptions_per_step": train.get("descriptions_per_step"),
        "peak_bytes_per_device": train.get("peak_bytes") or train.get("needed_bytes"),
        "argument_bytes_per_device": train.get("argument_bytes"),
        "memory_per_device_bytes": start["memory_per_device_bytes"],
        "fits": start["fits"],
        "flops_per_image": train.get("flops_per_image"),
        "compile_s": train.get("compile_s"),
        "step_time": step_time_estimate(start) if start["fits"] else None,
        **{k: found[k] for k in ("largest_batch", "smallest_failing_batch", "exact", "batch_unit", "probes")},
    }


DEFAULT_MESH = (-1, 1, 1)
"""The mesh of every row written before rows recorded `mesh_config`: all data-parallel."""


def cell_key(
    variant: str,
    stage: str,
    target_label: str,
    settings: Mapping[str, Any],
    start_batch: int | None = None,
) -> tuple:
    """What makes two cells the same measurement: model, stage, target, the batch the search started from (None:
    the paper's) and the `settings` a sweep sets (a config's or a row's: the mesh as the config gives
    it, e.g. `(-1, 16, 1)`). The remat policy counts only where a tower is rematerialised."""
    remat = tuple(settings["remat"])
    policy = settings["remat_policy"] if remat else None
    flags = settings["dtype"], bool(settings["scan_layers"]), remat, policy, settings.get("protocol", "authors")
    return variant, stage, target_label, tuple(settings["mesh"]), start_batch, *flags


def _row_settings(row: Mapping[str, Any]) -> dict[str, Any]:
    """A table row's sweep settings; the earliest rows recorded only the dtype, and rows written before a setting
    was recorded ran with its default."""
    return {
        "dtype": row["dtype"],
        "scan_layers": row.get("scan_layers", False),
        "remat": row.get("remat", ()),
        "remat_policy": row.get("remat_policy", "full"),
        "mesh": row.get("mesh_config", DEFAULT_MESH),
        "protocol": row.get("protocol", "authors"),
    }


def done_cells(path: str) -> dict[tuple, dict[str, Any]]:
    """The cells already in the JSON lines at `path` (none when it does not exist), by `cell_key`: a sweep that
    was stopped, or that a later session takes up again, compiles only the cells it lacks."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {cell_key(r["variant"], r["stage"], r["target"], _row_settings(r), r.get("start_batch")): r for r in rows}


def _where(row: dict[str, Any]) -> str:
    """The target, with its model-parallel mesh axes where the cell set any (`v5e-256, fsdp 16`)."""
    split = [f"{axis} {size}" for axis, size in (row.get("mesh") or {}).items() if axis != "data" and size > 1]
    return ", ".join([row["target"], *split])


def _towers(row: dict[str, Any]) -> str:
    """How the cell built its towers (`scan`, or `unrolled`, and the remat policy of the towers it wraps), which
    moves both the compile time and the peak memory a row shows."""
    remat = row.get("remat") or []
    how = "scan" if row.get("scan_layers") else "unrolled"
    return how + (f", remat {row.get('remat_policy') or 'full'} ({' + '.join(remat)})" if remat else "")


def _estimate(step_time: dict[str, Any] | None) -> str:
    """The step-time cell: the estimate, marked where only its compute-bound term is known."""
    estimate = (step_time or {}).get("estimate_s")
    if estimate is None:
        return "n/a"
    only = " (compute only)" if step_time.get("memory_bound_s") is None else ""
    return f"{estimate * 1e3:.0f} ms{only}"


def _batch(row: dict[str, Any]) -> str:
    """The batch cell: global descriptions (or captions), with the protocol where it is not the authors' and the
    set slots of a batch grouped by set (10 images each)."""
    notes = [row["protocol"]] if row.get("protocol", "authors") != "authors" else []
    if row.get("group_by_set"):
        notes.append(f"grouped, {row['images_per_step'] // 10} sets")
    return f"{row['batch']}" + (f" ({', '.join(notes)})" if notes else "")


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The cells as the fit table of docs/compile-and-fit.md. `state / device` is the step's arguments per device:
    the parameters, the optimizer state and the batch, which is what an `fsdp` axis divides."""
    head = (
        "| model | stage | target | towers | batch | peak / device | state / device | largest batch | GFLOP / image | "
        "compile | step time (roofline estimate) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        gib = (row["peak_bytes_per_device"] or 0) / (1 << 30)
        limit = row["memory_per_device_bytes"] / (1 << 30)
        state = row.get("argument_bytes_per_device")
        largest, high = f"{row['largest_batch']}", row["smallest_failing_batch"]
        if not row["exact"]:  # out of compiles: a lower bound, and an upper one once a batch failed
            largest = f"≥ {largest}" + (f", < {high}" if high else "")
        flops = f"{row['flops_per_image'] / 1e9:.0f}" if row["flops_per_image"] else "n/a"
        lines.append(
            f"| {row['variant']} | {row['stage']} | {_where(row)} | {_towers(row)} | {_batch(row)} "
            f"| {gib:.1f} of {limit:.0f} GiB"
            f"{'' if row['fits'] else ' (does not fit)'} | {'n/a' if state is None else f'{state / (1 << 30):.2f} GiB'}"
            f" | {largest} | {flops} | {row['compile_s']:.0f} s | "
            f"{_estimate(row['step_time'])} |"
        )
    return "\n".join(lines)


def sweep(
    variants: Sequence[str],
    stage_names: Sequence[str],
    target_names: Sequence[str],
    overrides: dict[str, Any],
    out: str,
    workdir: str,
    max_compiles: int,
    start_batch: int | None = None,
    found: Callable[[dict[str, Any]], None] = lambda row: None,
) -> list[dict[str, Any]]:
    """Every cell of the product, each appended to `out` and handed to `found` as soon as it is compiled (a sweep
    takes hours: the command prints each row then); a cell already in `out` (`done_cells`) is taken from there."""
    done = done_cells(out)
    overrides = dict(overrides)
    protocol = overrides.pop("protocol", "authors")
    rows = []
    for variant in variants:
        for stage in stage_names:
            for target_name in target_names:
                config = stage_config(stage, variant, protocol)
                config.update(overrides)
                settings = {"protocol": protocol, "remat_policy": config.remat_policy, "mesh": config.mesh}
                settings.update(dtype=config.dtype, scan_layers=config.scan_layers, remat=config.remat)
                key = cell_key(variant, stage, targets.parse(target_name).label, settings, start_batch)
                if key in done:
                    logging.info("%s %s on %s: already in %s", variant, stage, target_name, out)
                    rows.append(done[key])
                    continue
                where = os.path.join(workdir, variant.replace("/", ""), stage, protocol, target_name)
                try:
                    row = cell(config, stage, variant, target_name, where, max_compiles, start_batch, protocol)
                except ValueError as error:
                    raise ValueError(f"{variant} {stage} on {target_name}: {error}") from error
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                found(row)
    return rows
