"""The logical axes that parameters and activations name (`embed`, `mlp`, `heads`, `batch`, ...), their default
mapping onto the three mesh axes, and the activation constraint model code calls: all that the models need of
sharding, so that they never import the mesh-building layer (`parallel.py`, which builds on this module).

Model code names logical axes only; which mesh axis (if any) each maps to is the run config's choice
(`logical_rules`). Without a mesh in scope (conversion, one-device tests) the constraint does nothing.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from flax.core import spmd as flax_spmd
from flax.linen import logical_to_mesh_axes
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
"""Mesh axis names, in the order a config's mesh shape gives their sizes."""

BATCH_AXES = ("data", "fsdp")
"""Both data parallelism and FSDP split the batch; FSDP additionally splits the parameters."""

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
)
"""Logical axis -> mesh axes, in priority order (flax semantics: within one array a mesh axis is used at most
once, so an earlier rule wins a conflict). Logical names without a rule are replicated."""


def logical_rules(overrides: Sequence[Sequence[Any]] | None = None) -> Rules:
    """`DEFAULT_RULES` with a config's `(logical, mesh axes)` pairs taking precedence.

    A logical name given in `overrides` drops all its default rules; mesh axes may be a name, a sequence of
    names (ml_collections hands back lists) or None (replicate). Unknown mesh axes are an error naming the rule.
    """
    given: list[tuple[str, MeshAxes]] = []
    for rule in overrides or ():
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"sharding rule {rule!r} must be a (logical axis, mesh axes) pair")
        logical, target = rule
        if target is not None and not isinstance(target, str):
            target = tuple(target) or None
        names = () if target is None else (target,) if isinstance(target, str) else target
        unknown = [name for name in names if name not in MESH_AXES]
        if unknown:
            raise ValueError(f"sharding rule {rule!r} names mesh axes {unknown}; the mesh has {MESH_AXES}")
        given.append((logical, target))
    overridden = {logical for logical, _ in given}
    return (*given, *((logical, target) for logical, target in DEFAULT_RULES if logical not in overridden))


def logical_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    rules: Rules = DEFAULT_RULES,
    *,
    name: str | None = None,
) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`.

    A dimension its mesh axes do not divide is replicated instead (logged at INFO under `name`): tiny test
    models, two-head decoders and odd vocabularies then run on any mesh, only less sharded.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name or 'array'}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    spec = list(logical_to_mesh_axes(tuple(logical_axes), rules))
    sizes = dict(mesh.shape)
    replicated = []
    for dim, (size, target) in enumerate(zip(shape, spec, strict=True)):
        if target is None:
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        missing = [axis for axis in names if axis not in sizes]
        if missing:
            raise ValueError(f"{name or 'array'}: rules map to mesh axes {missing} that the mesh {sizes} lacks")
        ways = math.prod(sizes[axis] for axis in names)
        if size % ways:
            spec[dim] = None
            replicated.append(f"dim {dim} ({logical_axes[dim]}={size}) over {names} ({ways})")
    if replicated and name:
        logging.info("%s: replicated %s: not divisible", name, "; ".join(replicated))
    return PartitionSpec(*spec)


def with_logical_constraint(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    rules: Rules | None = None,
    mesh: Mesh | AbstractMesh | None = None,
) -> jax.Array:
    """Constrains an activation's sharding by logical axis names, e.g. `("batch", None, "embed")`.

    Defaults let model code stay mesh-free: the mesh is the one set by `jax.set_mesh` and the rules those of
    `nnx.logical_axis_rules` (else `DEFAULT_RULES`). Without a mesh (conversion, 1-device tests) it is a no-op.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return x
    rules = (flax_spmd.get_logical_axis_rules() or DEFAULT_RULES) if rules is None else rules
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(logical_axes, x.shape, mesh, rules)))
