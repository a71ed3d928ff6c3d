"""Mesh, logical-axis rules, shardings for state and batch, and multi-process start-up.

The same step runs on 1 CPU, 8 simulated CPU devices, a GPU node and a TPU pod; only config values differ.
That works because the mesh always has the three axes `data`, `fsdp` and `tensor` (size 1 where unused),
every parameter names its dimensions with logical axes (`embed`, `mlp`, `heads`, ... in `models/layers.py`),
and rules (`models/axes.py`) map those names onto mesh axes. Model code never mentions a mesh axis.

Typical use in a trainer (`jax.jit` with explicit shardings is the pjit; there is no `pmap`):

    initialize_distributed(coordinator, num_processes, process_id)  # before anything touches devices
    mesh = make_mesh(mesh_shape)  # e.g. (-1, 1, 1): pure data parallelism over every device
    rules = logical_rules(rule_overrides)
    check_batch(global_batch, mesh)
    model = init_sharded(lambda: ContextBLIP(model_config, rngs=nnx.Rngs(seed)), mesh, rules)  # born in its shards
    shardings = flat_param_shardings(model, mesh, rules)  # by dotted name; the optimizer's: optimizer_shardings
    step = jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=..., donate_argnums=0)

Imports: `models`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from contextblip_jax.models.axes import (
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    logical_spec,
)
from contextblip_jax.models.layers import dotted_path

# -- mesh --------------------------------------------------------------------------------------------------------


def resolve_mesh_shape(shape: Sequence[int], device_count: int) -> tuple[int, ...]:
    """The mesh sizes for `device_count` devices, with a single -1 standing for "the rest".

    Pure arithmetic, so a config can be checked before any device is touched or anything compiled.
    """
    given = tuple(shape)
    if len(given) != len(MESH_AXES):
        raise ValueError(f"mesh shape {given} must give {len(MESH_AXES)} sizes, one per axis {MESH_AXES}")
    if any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or (s < 1 and s != -1) for s in given):
        raise ValueError(f"mesh shape {given}: sizes must be positive integers or a single -1")
    given = tuple(int(s) for s in given)
    if given.count(-1) > 1:
        raise ValueError(f"mesh shape {given}: at most one axis may be -1 (the rest of the {device_count} devices)")
    fixed = math.prod(s for s in given if s != -1)
    if -1 in given:
        if device_count % fixed:
            raise ValueError(f"mesh shape {given}: the fixed axes ({fixed}) do not divide the {device_count} devices")
        return tuple(device_count // fixed if s == -1 else s for s in given)
    if fixed != device_count:
        raise ValueError(f"mesh shape {given} needs {fixed} devices, but there are {device_count}")
    return given


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (or `devices`); `shape` as in `resolve_mesh_shape`.

    `jax.make_mesh` orders the devices for the hardware's interconnect (TPU torus rings, GPU NVLink islands).
    The axes are `Auto` (GSPMD propagates shardings through the step from the jit in/out shardings);
    jax 0.10 would default to `Explicit`, which makes every operation's sharding part of its type.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    mesh = jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    logging.info("mesh %s over %d %s devices", dict(mesh.shape), len(devices), devices[0].platform)
    return mesh


# -- state ---------------------------------------------------------------------------------------------------------


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state: Any, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for every array in a model's `nnx.State` (concrete or from `nnx.eval_shape`), same structure.

    A variable's `out_sharding` metadata (its logical axes) goes through `rules`; variables without it (RNG
    state) and plain arrays are replicated. The result can be passed to `jax.jit(in_shardings=/out_shardings=)`
    and `jax.device_put` for the state it was computed from. The optimizer state is sharded from these by
    `optimizer_shardings`, the one place that decides it.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path: tuple, leaf: Any) -> Any:
        if not _is_variable(leaf):
            return replicated
        axes = leaf.get_metadata().get("out_sharding")
        shape = tuple(getattr(leaf.get_value(), "shape", ()))
        if not axes:
            return leaf.replace(replicated)
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        return leaf.replace(NamedSharding(mesh, logical_spec(axes, shape, mesh, rules, name=name)))

    return jax.tree_util.tree_map_with_path(sharding, abstract_state, is_leaf=_is_variable)


def flat_param_shardings(model: nnx.Module, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Each parameter's NamedSharding by dotted path (`blip.vision.blocks.0.fc1.kernel`), for the trainer's flat
    parameter dicts."""
    tree = param_shardings(nnx.state(model, nnx.Param), mesh, rules)
    return {dotted_path(path): getattr(value, "value", value) for path, value in nnx.to_flat_state(tree)}


def optimizer_shardings(abstract_opt_state: Any, param_sharding: dict, mesh: Mesh | AbstractMesh) -> Any:
    """Shardings for an optax state over flat parameter dicts (concrete or from `jax.eval_shape(tx.init, ...)`),
    same structure: each moment follows its parameter's sharding (found by the parameter's name in the moment's
    path), which is what makes FSDP save optimizer memory; counts and other scalars are replicated.

    The only place optimizer shardings are decided: the trainer and `--compile_only` get theirs through
    `programs.build`, and a test checks them against the parameters' on the trainer's own optimizer."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path: tuple, leaf: Any) -> NamedSharding:
        for key in reversed(path):
            name = getattr(key, "key", None)
            if name in param_sharding and getattr(leaf, "shape", ()):
                return param_sharding[name]
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, abstract_opt_state)


def shard_state(state: Any, shardings: Any) -> Any:
    """Places `state` as `shardings` say (a tree from `param_shardings`): converted or restored weights."""
    return jax.device_put(state, shardings)


def init_sharded(
    create: Callable[[], nnx.Module],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    given: Mapping[str, Any] | None = None,
) -> nnx.Module:
    """`create()`'s module with every variable in its shards from the start: no device ever holds a whole
    parameter of which it needs only a shard, as a ViT-L on a TPU pod requires.

    Variables named in `given` (dotted paths) take those values: an array already in its sharding (read so by
    Orbax) stays as it is, anything else (a host array from a converted PyTorch checkpoint) is split onto the
    devices. The others are drawn inside `jax.jit` with their shardings as outputs, so each device computes
    only its own shards, and the initialisers of the given ones are never run. Threefry is partitionable, so
    the draws are those of an eager `create()` on any mesh; compiled as one program, the arithmetic on them
    (scales, the fan-in divisions of `layers.redraw_*`) may round differently: values match an eager build
    within 1 ulp, not bit for bit (tests/models/test_init.py, tests/test_sharded_init.py).

    The temporaries are per shard too: `layers.redraw_*` (`init` fan_in and torch) draw each parameter in its own
    shape, and the largest array of the compiled per-device program is a shard (the word embedding's). Measured
    for B/16 (1.1 GB, 140 MB of shards per device) on fsdp = 8: 131 MB of temporaries per device with fan_in,
    187 MB with torch, 204 MB with bert; one draw sliced over all the kernels had needed 2.9 GB with fan_in.
    """
    graphdef, state = nnx.split(nnx.eval_shape(create))
    shardings = {
        dotted_path(path): var.get_value() for path, var in nnx.to_flat_state(param_shardings(state, mesh, rules))
    }
    given = given or {}
    missing = {name: sharding for name, sharding in shardings.items() if name not in given}

    def draw() -> dict[str, jax.Array]:
        variables = nnx.to_flat_state(nnx.state(create()))
        return {dotted_path(path): var.get_value() for path, var in variables if dotted_path(path) in missing}

    drawn = jax.jit(draw, out_shardings=missing)() if missing else {}
    logging.info("%d arrays given, %d drawn in their shards", len(shardings) - len(missing), len(missing))
    for path, variable in nnx.to_flat_state(state):
        name = dotted_path(path)
        value = drawn[name] if name in drawn else _place(name, given[name], variable.get_value(), shardings[name])
        variable.set_value(value)
    return nnx.merge(graphdef, state)


def _place(name: str, value: Any, like: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    """`value` in `sharding` and `like`'s dtype; an array already in that sharding is converted where it lies."""
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{name}: given shape {tuple(value.shape)}, the model's is {tuple(like.shape)}")
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value.astype(like.dtype)
    return jax.device_put(np.asarray(value, like.dtype), sharding)


# -- batch ---------------------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh | AbstractMesh, ndim: int = 1) -> NamedSharding:
    """Splits the leading (batch) axis over data × fsdp and replicates the other `ndim - 1` axes (and `tensor`)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    """Into how many parts `batch_sharding` cuts the leading axis: data × fsdp."""
    return math.prod(dict(mesh.shape)[axis] for axis in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh | AbstractMesh) -> None:
    """Fails before compilation when the global batch cannot be split evenly over data × fsdp."""
    ways = batch_shards(mesh)
    if global_batch < 1 or global_batch % ways:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the data-parallel size {ways} "
            f"(data × fsdp of mesh {dict(mesh.shape)})"
        )


# -- multi-process -------------------------------------------------------------------------------------------------


def _count(value: str | None) -> int:
    """An integer from the environment, 0 when absent or malformed (a count of 0 means 'not a cluster')."""
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _detected_cluster() -> str | None:
    """Describes the multi-process launcher this process runs under, or None for a single process.

    Only the environment is read: jax's own cluster detection then finds coordinator and process ids.
    """
    env = os.environ
    tasks = _count(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS"))
    if "SLURM_JOB_ID" in env and tasks > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} with {tasks} tasks"
    if _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return f"Open MPI with {env['OMPI_COMM_WORLD_SIZE']} ranks"
    for variable in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [host for host in env.get(variable, "").split(",") if host.strip()]
        if len(hosts) > 1:
            return f"TPU pod ({variable} lists {len(hosts)} hosts)"
    if _count(env.get("MEGASCALE_NUM_SLICES")) > 1:
        return f"TPU multislice with {env['MEGASCALE_NUM_SLICES']} slices"
    return None


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
) -> bool:
    """Starts `jax.distributed` when this is one of several processes; returns whether it did.

    Must run before anything else touches jax devices. Explicit arguments win (`coordinator="auto"` asks jax
    to detect everything, e.g. on a GCE TPU pod whose topology lives in the metadata server). Without them a
    SLURM job with several tasks, an Open MPI run or a TPU pod announced in the environment is detected and
    `jax.distributed.initialize()` is left to find coordinator and ids itself. Anything else is one process.

    `heartbeat_timeout_s` bounds how long the others wait for a lost process (None: jax's default, 100 s);
    `_log_lost_peer` says what that looks like, since the runtime's own last words may not.
    """
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised")
        return False
    timeouts = {} if heartbeat_timeout_s is None else {"heartbeat_timeout_seconds": heartbeat_timeout_s}
    explicit = any(value is not None for value in (coordinator, num_processes, process_id))
    if explicit and num_processes == 1:
        logging.info("single process (num_processes=1): jax.distributed not started")
        return False
    if explicit:
        if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is outside 0..{num_processes - 1} (num_processes)")
        address = None if coordinator == "auto" else coordinator
        logging.info(
            "starting jax.distributed: coordinator=%s num_processes=%s process_id=%s",
            address or "auto-detected",
            num_processes,
            process_id,
        )
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id, **timeouts
        )
    else:
        cluster = _detected_cluster()
        if cluster is None:
            logging.info("single process: jax.distributed not started")
            return False
        logging.info("starting jax.distributed for %s (auto-detected)", cluster)
        jax.distributed.initialize(**timeouts)
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
    _log_lost_peer(heartbeat_timeout_s)
    return True


def _log_lost_peer(heartbeat_timeout_s: int | None) -> None:
    """Says, once at start, how this process ends if another one is lost, and what to do then.

    jax's runtime ends the survivors by aborting them from C++ (SIGABRT), which no Python handler can intercept
    or reword, and its last words depend on how the peer went (measured with 2 CPU processes and gloo). The
    coordination service notices a process that stopped sending heartbeats once the timeout has passed ("The
    following tasks are unhealthy (stopped sending heartbeats): 1", then "Terminating process because the JAX
    distributed service detected fatal errors. This most likely indicates that another task died"): a frozen or
    partitioned host, and also a killed process whose closed sockets the collective in flight did not notice.
    A lost coordinator is noticed by the others' next poll or heartbeat (at once when its sockets close). But a
    collective that was reading from a process just killed may fail first, within a second, in gloo's own words
    ("Received data size doesn't match expected size. Is there a distributed collective mismatch in your
    code?"), which misname the cause: this line, earlier in the same log, names it.
    """
    bound = f"{heartbeat_timeout_s} s" if heartbeat_timeout_s is not None else "jax's default heartbeat timeout"
    logging.info(
        "if another process is lost, jax's distributed runtime aborts this one within %s of the peer's last "
        "heartbeat (sooner when its connections close, possibly with a misleading collectives error such as gloo's "
        "'collective mismatch'); rerun every process with the same command to resume from the last checkpoint that "
        "all of them committed",
        bound,
    )
