"""Compiling a run for hardware this machine does not have: will it compile, and does it fit?

aot.py       `--compile_only=TARGET`: the run's own steps compiled for a TPU slice or GPU node, memory and FLOPs
fit.py       the largest global batch that fits each target, and the fit table (`python -m contextblip_jax.fit`)
targets.py   compile targets by name and the memory of their devices
hardware.py  a device's peak arithmetic rate and memory, for MFU

Imports, for every module here: each other and `data`, `models`, `parallel`, `runconfig`, `stages`, `training`.
"""
