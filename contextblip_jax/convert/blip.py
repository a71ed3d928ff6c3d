"""PyTorch BLIP checkpoint -> checked, re-laid-out parameters for `BlipRetrieval`, and back into a model.

Nothing is written or built until every key and shape has been checked; all problems are reported at once.

Imports: its own package (`convert`), `models`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contextblip_jax.convert import infer, names
from contextblip_jax.convert.errors import ConversionError
from contextblip_jax.convert.mapping import Path, Rule, blip_rules
from contextblip_jax.convert.sources import RawCheckpoint
from contextblip_jax.models.blip import BlipRetrieval
from contextblip_jax.models.config import BlipConfig
from contextblip_jax.models.layers import dotted_path

M = TypeVar("M", bound=nnx.Module)


@dataclasses.dataclass
class ConvertedBlip:
    """Parameters by dotted NNX path (float32), the architecture, and facts about the source."""

    config: BlipConfig
    params: dict[str, jax.Array]
    itm_first_token: str
    dropped: dict[str, int]


def param_shapes(factory: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from abstract evaluation of `factory` (no memory is allocated)."""
    model = nnx.eval_shape(factory)
    return {dotted_path(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def convert_blip(raw: RawCheckpoint, overrides: Mapping[str, Any] | None = None) -> ConvertedBlip:
    """Checks and converts `raw`, consuming its tensors.

    `overrides` is a partial model config, e.g. `{"vision": {"image_size": 224}}`.
    """
    original = names.is_original_naming(raw.tensors)
    tensors, dropped = names.canonical(raw.tensors)
    raw.tensors.clear()  # `tensors` now holds the only references, freed one by one below
    config, problems = _resolve_config(raw, tensors, original, overrides or {})
    if config is None:
        raise ConversionError(raw.path, problems)
    rules = blip_rules(config)
    shapes = param_shapes(lambda: BlipRetrieval(config, rngs=nnx.Rngs(0)))
    if set(map(dotted_path, rules)) != set(shapes):
        raise AssertionError("conversion rules and model parameters disagree; this is a bug")
    problems += check_rules(rules, shapes, tensors)
    if problems:
        raise ConversionError(raw.path, problems)
    return ConvertedBlip(
        config=config,
        params=apply_rules(rules, shapes, tensors),
        itm_first_token="enc" if original else "cls",
        dropped=dropped,
    )


def build_model(config: BlipConfig, params: Mapping[str, np.ndarray], dtype: jnp.dtype = jnp.float32) -> BlipRetrieval:
    """A `BlipRetrieval` holding `params` (cast to float32) and computing in `dtype`."""
    return load_params(nnx.eval_shape(lambda: BlipRetrieval(config, dtype=dtype, rngs=nnx.Rngs(0))), params)


def load_params(model: M, params: Mapping[str, Any]) -> M:
    """`model` with the parameters named in `params` (dotted paths) set, as float32. An abstract model (from
    `nnx.eval_shape`) needs every parameter; a real one keeps its own values for those not given."""
    graphdef, state = nnx.split(model)
    for path, variable in nnx.to_flat_state(state):
        name = dotted_path(path)
        if isinstance(variable, nnx.Param) and name in params:
            variable.set_value(jnp.asarray(params[name], dtype=jnp.float32))
    return nnx.merge(graphdef, state)


def _resolve_config(
    raw: RawCheckpoint, tensors: Mapping[str, np.ndarray], original: bool, overrides: Mapping[str, Any]
) -> tuple[BlipConfig | None, list[str]]:
    missing = infer.missing_for_inference(tensors)
    inferred = None
    if not missing:
        inferred = infer.infer_config(tensors, infer.ORIGINAL_VISION_EPS if original else 1e-5)
    if raw.hf_config is not None:
        try:
            base = infer.config_from_hf(raw.hf_config)
        except (TypeError, ValueError) as error:
            return None, [f"invalid model config: {error}"]
    elif inferred is not None:
        base = inferred
    else:
        return None, [f"missing key {key} (needed to infer the architecture)" for key in missing]
    return infer.resolve(base, overrides, inferred, lambda config: config)


def check_rules(
    rules: Mapping[Path, Rule], shapes: Mapping[str, tuple[int, ...]], tensors: Mapping[str, np.ndarray]
) -> list[str]:
    problems: list[str] = []
    for path, rule in rules.items():
        if rule.key not in tensors:
            problems.append(f"missing key {rule.key}")
        elif problem := rule.problem(tensors[rule.key], shapes[dotted_path(path)]):
            problems.append(problem)
    used = {rule.key for rule in rules.values()}
    problems += [f"unused key {key}" for key in sorted(set(tensors) - used)]
    return list(dict.fromkeys(problems))


def apply_rules(
    rules: Mapping[Path, Rule], shapes: Mapping[str, tuple[int, ...]], tensors: dict[str, np.ndarray]
) -> dict[str, jax.Array]:
    """Applies every rule, freeing each source tensor after its last use to keep peak memory near 1x.

    The results are JAX arrays: Orbax saves those with less extra memory than numpy arrays.
    """
    by_key: dict[str, list[Path]] = defaultdict(list)
    for path, rule in rules.items():
        by_key[rule.key].append(path)
    params: dict[str, jax.Array] = {}
    for key, paths in by_key.items():
        source = tensors.pop(key)
        for path in paths:
            name = dotted_path(path)
            params[name] = jnp.asarray(rules[path].apply(source, shapes[name]), dtype=jnp.float32)
        del source
    return params


def to_dtype(params: Mapping[str, jax.Array], dtype: str) -> dict[str, jax.Array]:
    """Storage dtype for a converted checkpoint (`float32` or `bfloat16`); arrays already in it are not copied."""
    target = jnp.dtype(dtype)
    return {key: value if value.dtype == target else value.astype(target) for key, value in params.items()}
