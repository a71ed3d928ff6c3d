"""`python -m contextblip_jax.benchmark`: throughput measurements, one JSON object per line.

    python -m contextblip_jax.benchmark --preset=base --measure=zeroshot --runs=5

Measurements:
- `zeroshot`: scoring one description against its candidates (ViT -> adapter -> ITM pass), with the adapter
  and without it (plain BLIP on the same inputs), plus the adapter's relative overhead.

Each figure is the median wall time of `--runs` timed calls after `--warmup` untimed ones (compilation
excluded), on random weights and inputs; the line names the device it ran on.

Imports: the model and its variant table only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.variants import VARIANTS

PRESETS: dict[str, ContextBLIPConfig] = {
    "tiny": VARIANTS["tiny"],
    "small": VARIANTS["small"],
    "base": VARIANTS["B/16"],
    "large": VARIANTS["L/16"],
}
"""Benchmark names for rows of the variant table (`models/variants.py`)."""

_PRESET = flags.DEFINE_enum("preset", "base", list(PRESETS), "Model size (base: ViT-B/16 at 224 px).")
_MEASURE = flags.DEFINE_enum("measure", "zeroshot", ["zeroshot"], "What to measure.")
_DESCRIPTIONS = flags.DEFINE_integer("descriptions", 1, "Descriptions per call (each with --candidates images).")
_CANDIDATES = flags.DEFINE_integer("candidates", 10, "Candidate images per description.")
_TEXT_LENGTH = flags.DEFINE_integer("text_length", 64, "Tokens per description.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed calls; the median is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls first (the first one compiles).")


def interleaved_medians(fns: list[Callable[[], Any]], runs: int, warmup: int) -> list[tuple[float, list[float]]]:
    """Median wall time of each function, timed in turns (A, B, A, B, ...) so that drift in the machine's load
    affects all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            bucket.append(time.perf_counter() - start)
    return [(statistics.median(bucket), bucket) for bucket in times]


def device_name() -> str:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    host = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            host = f"{models[0]} x{len(models)} threads"
    return f"{jax.device_count()}x {kind} ({device.platform}); host {host}"


def zeroshot(config: ContextBLIPConfig) -> list[dict[str, Any]]:
    dtype = jnp.dtype(_DTYPE.value)
    model = ContextBLIP(config, dtype=dtype, rngs=nnx.Rngs(0))
    size = config.blip.vision.image_size
    rng = np.random.default_rng(0)
    shape = (_DESCRIPTIONS.value, _CANDIDATES.value, size, size, 3)
    images = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ids = jnp.asarray(rng.integers(1000, 30000, (_DESCRIPTIONS.value, _TEXT_LENGTH.value)), jnp.int32)
    mask = jnp.ones_like(ids)

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

    rows = []
    medians = {}
    timed = interleaved_medians(
        [lambda: with_adapter(model), lambda: without_adapter(model)], _RUNS.value, _WARMUP.value
    )
    for adapter, (median, times) in zip((True, False), timed, strict=True):
        medians[adapter] = median
        rows.append(
            {
                "measure": "zeroshot_forward",
                "adapter": adapter,
                "median_s": round(median, 4),
                "images_per_s": round(_DESCRIPTIONS.value * _CANDIDATES.value / median, 2),
                "times_s": [round(t, 4) for t in times],
            }
        )
    rows.append(
        {
            "measure": "adapter_overhead",
            "relative": round(medians[True] / medians[False] - 1.0, 4),
        }
    )
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common = {
        "preset": _PRESET.value,
        "dtype": _DTYPE.value,
        "descriptions": _DESCRIPTIONS.value,
        "candidates": _CANDIDATES.value,
        "text_length": _TEXT_LENGTH.value,
        "runs": _RUNS.value,
        "device": device_name(),
    }
    for row in zeroshot(PRESETS[_PRESET.value]):
        print(json.dumps({**row, **common}), flush=True)


if __name__ == "__main__":
    app.run(main)
