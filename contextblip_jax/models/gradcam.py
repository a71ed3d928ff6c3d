"""Heatmaps of what the ITM pass looked at: gradient-weighted cross-attention (Grad-CAM on BLIP's cross-attention,
the map LAVIS draws for BLIP).

For one text layer's cross-attention probabilities P [rows, heads, T, 1 + grid²] and the gradient G of each
candidate's score with respect to them, the map of a (description, candidate) pair is

    mean over heads and text tokens of  P · max(G, 0),   over the patch keys (the CLS key dropped)

on the vision tower's patch grid, over the description's real tokens (padding left out). The score reads the
first token's output only, so at the last layer only `[ENC]`'s row has a gradient and the map is its map; at an
earlier layer every token's row reaches the score through the later layers' self-attention.

The score is the stage's `match` (`stages.Stage.match`): one candidate's own score, so the
gradient of their sum gives every pair's gradient in one backward pass.

`rule="gradient"` drops P: the mean of max(G, 0) alone, where more attention would raise the score, whether or not
the model attends there (a check on maps that follow the attention whatever the text).

The gradient is read through an `AttentionProbe`: zeros added to the chosen layer's probabilities for this one
call, whose gradient is the probabilities' gradient; the model is left as it was afterwards.

    maps = heatmaps(model, stages.get("finetune").match, images, ids, mask, layer=-1)   # [D, C, grid, grid]

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import AttentionProbe

Match = Callable[[ContextBLIP, jax.Array], jax.Array]
RULES = ("gradcam", "gradient")


@dataclasses.dataclass(frozen=True)
class Heatmaps:
    """`scores` [D, C]: the explained score of each candidate; `maps` [D, C, grid, grid]: non-negative."""

    scores: np.ndarray
    maps: np.ndarray


def heatmaps(
    model: ContextBLIP,
    match: Match,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    layer: int = -1,
    set_index: jax.Array | None = None,
    rule: str = "gradcam",
) -> Heatmaps:
    """Every candidate's map for every description (module docstring). `images` and `set_index` as
    `ContextBLIP.candidate_match` takes them; `layer` indexes the text encoder's layers (negative from the end);
    `rule` is one of `RULES` (module docstring)."""
    if rule not in RULES:
        raise ValueError(f"heatmap rule {rule!r} unknown; choose from {RULES}")
    text = model.blip.text
    depth = len(text.layers)
    if not -depth <= layer < depth:
        raise ValueError(f"heatmap layer {layer} out of range: the text encoder has {depth} layers")
    descriptions, candidates = input_ids.shape[0], images.shape[1]
    heads = model.config.blip.text.num_heads
    shape = (descriptions * candidates, heads, input_ids.shape[1], model.config.blip.vision.num_tokens)
    attention, scan = text.layers[layer].cross_attn, text.scan
    attention.probe = AttentionProbe(jnp.zeros(shape, jnp.float32))
    text.scan = False  # the probe sits on one layer; scanned layers would need it on all of them
    try:
        graphdef, probe, rest = nnx.split(model, AttentionProbe, ...)
        arrays = (images, input_ids, attention_mask, set_index)
        gradient, scores, probs = _gradient(graphdef, probe, rest, *arrays, match, layer)
    finally:
        attention.probe, text.scan = None, scan
    cam = np.maximum(np.asarray(gradient), 0.0)  # [rows, heads, T, K]
    if rule == "gradcam":
        cam = np.asarray(probs) * cam
    per_token = cam.mean(axis=1)  # [rows, T, K]
    rows = np.repeat(np.asarray(attention_mask, np.float64), candidates, axis=0)  # [rows, T]
    mixed = np.einsum("rt,rtk->rk", rows, per_token) / np.maximum(rows.sum(axis=1, keepdims=True), 1.0)
    grid = model.config.blip.vision.grid
    maps = mixed[:, 1:].reshape(descriptions, candidates, grid, grid)
    return Heatmaps(np.asarray(scores).reshape(descriptions, candidates), maps)


@functools.partial(jax.jit, static_argnames=("graphdef", "match", "layer"))
def _gradient(
    graphdef: nnx.GraphDef,
    probe: nnx.State,
    rest: nnx.State,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    set_index: jax.Array | None,
    match: Match,
    layer: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The probabilities' gradient, the scores [rows] and the probabilities, all from one forward pass."""

    def total(probe: nnx.State) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        model = nnx.merge(graphdef, probe, rest)
        out = model.candidate_match(images, input_ids, attention_mask, set_index=set_index)
        scores = match(model, out.last_hidden_state[:, 0])
        return scores.sum(), (scores, out.cross_attention[layer])

    gradient, (scores, probs) = jax.grad(total, has_aux=True)(probe)
    (leaf,) = jax.tree.leaves(gradient)
    return leaf, scores, probs
