"""Compilation targets of `--compile_only`: a name (`v5e-8`, `v5litepod-8`, `h100x8`, `cpu`) -> the devices a
program can be compiled for on this machine, and the memory each of them has.

TPU slices come from libtpu's deviceless topologies, NVIDIA nodes from the CUDA plugin's target configs
(`pip install -e ".[accelerators]"`); neither needs the hardware. Grammar:

    cpu                        this machine's own devices (what `jax.devices()` gives)
    v4-N, v5p-N                N TensorCores as gcloud counts them (N/2 megacore chips): 8 16 32 64 128 256 512 1024
    v5e-N, v6e-N               N chips: 4 8 16 32 64 128 256 (gcloud's v5e name `v5litepod-N` is accepted)
    MODEL, MODELxG, GxMODEL    G GPUs on one host (default 8); MODEL: a100 (80 GB SXM), h100 (SXM), h200
    HxGxMODEL                  H hosts with G GPUs each

Several TPU slices (multi-slice over the data-centre network) are a separate count, `num_slices`.

Imports: its own package (`compile`) only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import jax

GIB = 1 << 30

TPU_FAMILIES: dict[str, tuple[str, str, int, int]] = {
    "v4": ("v4", "megacore", 32 * GIB, 2),
    "v5p": ("v5", "megacore", 95 * GIB, 2),
    "v5e": ("v5e", "default", 16 * GIB, 1),
    "v6e": ("v6e", "default", 32 * GIB, 1),
}
"""gcloud family -> (libtpu topology prefix, chip config, HBM per chip, TensorCores per count unit).

v4 and v5p are named by TensorCores (`v4-8` is 4 chips of 2 cores) and compiled as megacore chips, one device per
chip, as on the real slices; v5e and v6e have one core per chip."""

TPU_GRIDS: dict[int, str] = {
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
"""v5e / v6e chips -> the 2D torus of that slice."""

TPU_CUBES: dict[int, str] = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}
"""v4 / v5p chips -> the 3D torus of that slice."""

TPU_ALIASES = {"v5litepod": "v5e"}
"""gcloud accelerator-type families that libtpu names differently."""

CHIPS_PER_HOST = (2, 2, 1)
"""Chips per TPU host as libtpu's topology wants them (4 chips per VM host, as maxtext's table gives)."""


def _gpu_config(description: str, cores: int, clock_ghz: float, memory: int, bandwidth: int, **extra: int) -> str:
    """XLA's `GpuTargetConfig` text proto for one GPU model: what the compiler needs to know of a device it
    cannot query (its SM count, memories, compute capability, limits)."""
    info = {
        "core_count": cores,
        "clock_rate_ghz": clock_ghz,
        "device_memory_size": memory,
        "memory_bandwidth": bandwidth,
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 49152,
        "threads_per_core_limit": 2048,
        "block_dim_limit_x": 2147483647,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
        **{k: v for k, v in extra.items() if k != "major"},
    }
    fields = " ".join(f"{key}: {value}" for key, value in info.items())
    return (
        f"gpu_device_info {{ {fields} cuda_compute_capability {{ major: {extra['major']} }} }}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info { major: 9 minor: 8 }\n"
        "runtime_version { major: 12 minor: 8 }\n"
        f'device_description_str: "{description}"\n'
    )


_HOPPER = dict(
    l2_cache_size=52428800,
    shared_memory_per_block_optin=232448,
    shared_memory_per_core=233472,
    fpus_per_core=128,
    major=9,
)

GPU_MODELS: dict[str, str] = {
    "h100": _gpu_config("NVIDIA H100 80GB HBM3", 132, 1.98, 84929347584, 3352320000000, **_HOPPER),
    "h200": _gpu_config("NVIDIA H200", 132, 1.98, 150754820096, 4800000000000, **_HOPPER),
    "a100": _gpu_config(
        "NVIDIA A100-SXM4-80GB",
        108,
        1.41,
        85899345920,
        2039000000000,
        l2_cache_size=41943040,
        shared_memory_per_block_optin=166912,
        shared_memory_per_core=167936,
        fpus_per_core=64,
        major=8,
    ),
}
"""GpuTargetConfig text protos by model (SXM data-sheet values)."""

GPU_MEMORY = {"h100": 84929347584, "h200": 150754820096, "a100": 85899345920}


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target name. kind: cpu, tpu or gpu. For TPU: libtpu's topology and chip config; for GPU: the
    model and `hosts` x `per_host` GPUs."""

    name: str
    kind: str
    memory_per_device: int | None = None
    topology: str = ""
    chip_config: str = ""
    model: str = ""
    hosts: int = 1
    per_host: int = 1
    num_slices: int = 1

    @property
    def label(self) -> str:
        return self.name if self.num_slices == 1 else f"{self.name} x {self.num_slices} slices"


def valid_names() -> str:
    """The grammar in one line, for error messages."""
    tpu = "; ".join(
        f"{family}-N with N in {' '.join(str(n * cores) for n in (TPU_CUBES if cores == 2 else TPU_GRIDS))}"
        for family, (_, _, _, cores) in TPU_FAMILIES.items()
    )
    models = ", ".join(sorted(GPU_MODELS))
    return (
        f"cpu; TPU {tpu} (v5litepod-N = v5e-N); GPU MODEL, MODELxG, GxMODEL or HxGxMODEL "
        f"(H hosts x G GPUs per host, e.g. h100x8, 8xh100, 2x8xh100) with MODEL in {models}"
    )


def parse(name: str, num_slices: int = 1) -> Target:
    """The target called `name` (see the module docstring); anything else is an error listing the valid names."""
    text = name.strip().lower()
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}")
    if text == "cpu":
        if num_slices != 1:
            raise ValueError("num_slices applies to TPU targets only")
        return Target("cpu", "cpu")
    tpu = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)-(\d+)", text)
    if tpu:
        family = TPU_ALIASES.get(tpu[1], tpu[1])
        prefix, chip_config, memory, cores = TPU_FAMILIES[family]
        count = int(tpu[2])
        shapes = TPU_CUBES if cores == 2 else TPU_GRIDS
        if count % cores == 0 and count // cores in shapes:
            topology = f"{prefix}:{shapes[count // cores]}"
            return Target(f"{family}-{count}", "tpu", memory, topology, chip_config, num_slices=num_slices)
    gpu = _gpu_counts(text)
    if gpu and num_slices == 1:
        model, hosts, per_host = gpu
        if model in GPU_MODELS and hosts >= 1 and per_host >= 1:
            label = f"{hosts}x{per_host}x{model}" if hosts > 1 else f"{per_host}x{model}"
            return Target(label, "gpu", GPU_MEMORY[model], model=model, hosts=hosts, per_host=per_host)
    raise ValueError(f"unknown compile target {name!r}; valid targets: {valid_names()}")


def _gpu_counts(text: str) -> tuple[str, int, int] | None:
    """(model, hosts, GPUs per host) of `h100`, `h100x8`, `8xh100` or `2x8xh100`; None for other shapes."""
    if match := re.fullmatch(r"([a-z]+\d+)(?:x(\d+))?", text):
        return match[1], 1, int(match[2] or 8)
    if match := re.fullmatch(r"(?:(\d+)x)?(\d+)x([a-z]+\d+)", text):
        return match[3], int(match[1] or 1), int(match[2])
    return None


def prepare_libtpu(target: Target) -> None:
    """Environment for loading libtpu without a TPU, set before it loads and only where unset (a TPU VM's own
    values stay). Without a TPU, libtpu prints 'could not determine TPU accelerator type' and a worker-hostname
    error; naming them silences it. libtpu also takes /tmp/libtpu_lockfile, which guards the chips: a deviceless
    compile opens none, and without ALLOW_MULTIPLE_LIBTPU_LOAD a second compiling process (a test worker, another
    user's compile) fails with 'Internal error when accessing libtpu multi-process lockfile'."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.replace("v5e-", "v5litepod-"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(target: Target) -> Sequence[jax.Device]:
    """The target's devices: descriptions a program can be compiled for (TPU, GPU) or this machine's (cpu)."""
    if target.kind == "cpu":
        return jax.devices()
    from jax.experimental import topologies

    if target.kind == "tpu":
        prepare_libtpu(target)
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=target.topology,
            chip_config_name=target.chip_config,
            chips_per_host_bounds=CHIPS_PER_HOST,
            num_slices=target.num_slices,
            wrap=(False, False, False),
        )
    else:
        topology = topologies.get_topology_desc(
            platform="cuda",
            target_config=GPU_MODELS[target.model],
            topology=f"1x{target.hosts}x{target.per_host}",
        )
    return topology.devices


def host_memory() -> int:
    """This machine's RAM, which the cpu target's devices share."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
