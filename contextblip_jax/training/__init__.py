"""The pieces a training run is made of; `train.py` puts them together in its loop.

step.py        the pure train and predict steps of every stage
programs.py    those steps jitted with the run's shardings, donation, remat and attention (also `--compile_only`)
optim.py       optimizers and learning-rate schedules from `config.optimizer`
inputs.py      the training input of a stage, and the main job's generated data
telemetry.py   `W/metrics.jsonl`, TensorBoard, the progress line, the curves plot
preemption.py  SIGTERM as a flag every process agrees on
skipped.py     damaged examples skipped and counted across hosts and resumes
hostmem.py     glibc settings that keep freed host memory for the next step
exclusive.py   one run per workdir: process 0 holds its lock, every process learns whether it could

Imports, for every module here: each other and `checkpoints`, `data`, `files`, `models`, `parallel`, `runconfig`,
`stages`.
"""
