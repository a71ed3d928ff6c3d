"""Throughput of the trainer's own steps, against PyTorch: `python -m contextblip_jax.benchmark` (`__main__.py`).

jax_steps.py    the JAX side: the stage's jitted train or predict step, XLA's FLOP count and memory estimate
torch_steps.py  the PyTorch side: transformers' BLIP + adapter + head, the same step, eager or compiled
sweep.py        descriptions and devices sweeps, a benchmark process per point
plots.py        a sweep's PNG plot
inputs.py       the grain pipeline's images/s at the step's batch shape
passes.py       whole evaluation and training passes over a split's first N sets, grouped or not, cached or not
profile.py      one traced JAX call: time per kind of XLA operation

Imports, for every module here: each other and `cli`, `compile`, `convert`, `data`, `evaluation`, `models`,
`parallel`, `runconfig`, `stages`, `training`.
"""
