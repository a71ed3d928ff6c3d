"""What the benchmark needs to know about the machine: its name, its peak arithmetic rate, its peak memory.

MFU (model FLOPs utilisation) is achieved FLOP/s over the device's peak. Accelerators are measured against their
vendor's dense peak for the dtype (the table below); a CPU has no such figure that holds across processors, so
its peak is measured in the same run: the best of several large matrix products.

Imports: its own package (`compile`) only.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

SPEC_PEAK_TFLOPS: dict[tuple[str, str], float] = {
    ("H100", "bfloat16"): 989.4,
    ("H100", "float32"): 494.7,
    ("H200", "bfloat16"): 989.4,
    ("H200", "float32"): 494.7,
    ("A100", "bfloat16"): 312.0,
    ("A100", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5", "bfloat16"): 459.0,
    ("TPU v6 lite", "bfloat16"): 918.0,
}
"""Dense peak TFLOP/s per chip by (device kind, compute dtype), from the vendors' data sheets (SXM parts for
NVIDIA). NVIDIA kinds match as substrings of jax's `device_kind`; TPU kinds exactly, since v5p reports itself as
`TPU v5` and v5e as `TPU v5 lite`. float32 on NVIDIA is the TF32 tensor-core rate: XLA's default matmul
precision uses TF32 there."""


def device_name() -> str:
    """`Nx <device kind> (<platform>); host <processor> x<threads>`."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    host = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            host = f"{models[0]} x{len(models)} threads"
    return f"{jax.device_count()}x {kind} ({device.platform}); host {host}"


SPEC_BANDWIDTH_GB_S: dict[str, float] = {
    "H100": 3350.0,
    "H200": 4800.0,
    "A100": 2039.0,
    "TPU v4": 1228.0,
    "TPU v5 lite": 819.0,
    "TPU v5": 2765.0,
    "TPU v6 lite": 1640.0,
}
"""Data-sheet HBM bandwidth per chip in GB/s, by device kind matched as `SPEC_PEAK_TFLOPS` (SXM parts, 80 GB A100)."""


def spec_peak_tflops(dtype: str) -> float | None:
    """The data-sheet peak of the first device for `dtype`, or None where the table has no row."""
    return spec_peak_for(getattr(jax.devices()[0], "device_kind", ""), dtype)


def spec_peak_for(kind: str, dtype: str) -> float | None:
    """The data-sheet peak TFLOP/s of a device of `kind` (jax's `device_kind`) for `dtype`; None if unknown."""
    for (name, row_dtype), peak in SPEC_PEAK_TFLOPS.items():
        if _is_kind(kind, name) and (row_dtype == dtype or name.startswith("TPU")):
            return peak
    return None


def spec_bandwidth_for(kind: str) -> float | None:
    """The data-sheet HBM bandwidth in GB/s of a device of `kind`; None if unknown."""
    return next((value for name, value in SPEC_BANDWIDTH_GB_S.items() if _is_kind(kind, name)), None)


def _is_kind(kind: str, name: str) -> bool:
    return kind == name if name.startswith("TPU") else name in kind


def best_matmul_tflops(product: Callable[[], Any], size: int, runs: int = 5) -> float:
    """The best rate of `product()`, a `size`^3 matrix product that returns once it is done, over `runs` calls
    after an untimed one: a CPU's practical peak, for JAX here and for PyTorch in the benchmark."""
    product()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e12


def measured_matmul_tflops(dtype: str, size: int = 2048, runs: int = 5) -> float:
    """JAX's best rate of a `size`^3 matrix product on the first device."""
    a = jnp.ones((size, size), dtype)
    square = jax.jit(lambda x: x @ x)
    return best_matmul_tflops(lambda: jax.block_until_ready(square(a)), size, runs)


def peak_tflops(dtype: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the data sheet on accelerators, a measured matmul on CPUs."""
    spec = spec_peak_tflops(dtype)
    if spec is not None:
        return spec, "data sheet"
    return measured_matmul_tflops(dtype), "measured 2048^3 matmul"


def peak_memory_bytes() -> tuple[int, str]:
    """(bytes, what they count): the device allocator's peak where it keeps one, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS"


def spread(times: list[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds, rounded for a JSON line."""
    return {
        "median": round(statistics.median(times), 5),
        "min": round(min(times), 5),
        "max": round(max(times), 5),
    }


def program_flops(fn: Callable[..., Any], *args: Any) -> float | None:
    """XLA's FLOP count of `fn(*args)` lowered for this host's CPU, whatever devices `args` live on (None where the
    CPU backend is not loaded).

    The count belongs to the program, not to a device: on GPUs the compiled program hands its matrix products to
    cuBLAS, and the GPU's cost analysis leaves them out (an H100 reported 1.6 TFLOP for a base finetune step that
    counts 26.5 here), and the plugin's `Lowered.cost_analysis` is not implemented at all. Arguments become
    abstract values on the CPU, so a sharded step is counted whole (unpartitioned) and nothing is copied.
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return None
    placed = jax.sharding.SingleDeviceSharding(cpu)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), args)
    cost = jax.jit(fn).trace(*abstract).lower().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return (cost or {}).get("flops")
