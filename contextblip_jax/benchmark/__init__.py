"""Throughput of the trainer's own steps, against PyTorch: `python -m contextblip_jax.benchmark` (`__main__.py`).

jax_steps.py    the JAX side: the stage's jitted train or predict step, XLA's FLOP count and memory estimate
torch_steps.py  the PyTorch side: transformers' BLIP + adapter + head, the same step, eager or compiled
"""
