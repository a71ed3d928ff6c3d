"""ContextBLIP in JAX/Flax NNX: BLIP towers, the ContextBLIP method, training and evaluation."""
