"""Scoring candidates: the ImageCoDe evaluators, accuracy and the leaderboard file, MMVP-VLM, and the scorer
that readies a run's model outside training.

evaluators.py  one evaluator per split, built once per run (the trainer's periodic evaluation, `evaluate`)
scoring.py     predictions over hosts, accuracy overall / video / static, the leaderboard file, MMVP pairs
scorer.py      a workdir's chosen checkpoint ready to score on the config's mesh
features.py    stage 2b's frozen-tower vectors of the training split, computed once and cached in the workdir

Imports, for every module here: each other and `checkpoints`, `data`, `files`, `models`, `parallel`, `runconfig`,
`stages`, `training.step`, `training.inputs`.
"""
