"""ContextBLIP's losses as pure functions (the authors' `models/multiscale_adapter.py` for stage 1,
`finetune_notf.py` and `finetune_context.py` for 2a/2b). All in float32.

Hard negatives are sampled from a similarity matrix over the whole batch the function is given. Under `jax.jit`
with the batch sharded over devices that batch is the global one, so by default negatives come from every
device's examples; the authors sample within each GPU's local batch (their `main.py` runs one process per GPU
under DistributedDataParallel, and `models/multiscale_adapter.py` samples from that process's batch), which
`groups` reproduces.

Imports: nothing of the package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sample_hard_negatives(
    key: jax.Array, similarity: jax.Array, temperature: float | None = None, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """BLIP's ITM negative sampling from `similarity` [B_img, B_txt] (B_img == B_txt, pair i is positive).

    Returns (negative image for each text [B], negative text for each image [B]). Weights are
    `softmax(sim / temperature) + 1e-4` with the positive excluded, so it is never drawn; no temperature is the
    authors' choice, BLIP divides by its learned one (about 0.07).

    `groups` > 1 splits the batch into that many consecutive equal blocks (the per-device shards of a global
    batch sharded in order) and draws each row's negative within its own block, the softmax over that block
    alone, exactly as if each block were sampled on its own.
    """
    size = similarity.shape[0]
    if groups < 1 or size % groups or size // groups < 2:
        raise ValueError(
            f"hard negatives: a batch of {size} cannot be split into {groups} equal blocks of at least 2 pairs"
        )
    sim = similarity.astype(jnp.float32)
    if temperature:
        sim = sim / temperature
    block = jnp.arange(size) // (size // groups)
    same_block = block[:, None] == block[None, :]
    candidate = same_block & ~jnp.eye(size, dtype=bool)

    def draw(k: jax.Array, rows: jax.Array) -> jax.Array:
        weights = jax.nn.softmax(jnp.where(same_block, rows, -jnp.inf), axis=-1) + 1e-4
        return jax.random.categorical(k, jnp.where(candidate, jnp.log(weights), -jnp.inf), axis=-1)

    image_key, text_key = jax.random.split(key)
    return draw(image_key, sim.T), draw(text_key, sim)


def itm_loss(positive_logits: jax.Array, negative_logits: jax.Array) -> jax.Array:
    """Cross-entropy of the ITM head: positives [B, 2] labelled 1, negatives [2B, 2] labelled 0."""
    logits = jnp.concatenate([positive_logits, negative_logits]).astype(jnp.float32)
    labels = jnp.concatenate(
        [jnp.ones(positive_logits.shape[0], jnp.int32), jnp.zeros(negative_logits.shape[0], jnp.int32)]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def tmim_loss(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over the masked patches' normalised pixels."""
    return jnp.mean(jnp.square(predicted.astype(jnp.float32) - target.astype(jnp.float32)))


def candidate_loss(logits: jax.Array, target: jax.Array, reduction: str = "sum") -> jax.Array:
    """Cross-entropy over each description's candidate logits [B, 10]; summed over descriptions as the authors
    do (`reduction="mean"` averages). A target below 0 marks a padding slot (grouped batches): it adds
    nothing and is not counted."""
    real = target >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(target, 0))
    total = jnp.sum(jnp.where(real, losses, 0.0))
    return total if reduction == "sum" else total / jnp.maximum(real.sum(), 1)


def mask_prediction_loss(mask_logits: jax.Array, masked: jax.Array) -> jax.Array:
    """`||M - sigmoid(W f + b)||²` averaged over patches: predict the text-derived binary mask (optional)."""
    return jnp.mean(jnp.square(masked.astype(jnp.float32) - jax.nn.sigmoid(mask_logits.astype(jnp.float32))))
