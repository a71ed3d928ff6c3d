"""Scoring candidates: the ImageCoDe evaluators, accuracy and the leaderboard file, MMVP-VLM, the scorer
that readies a run's model outside training, and the report that shows why predictions are wrong.

evaluators.py  one evaluator per split, built once per run (the trainer's periodic evaluation, `evaluate`)
scoring.py     predictions over hosts, accuracy overall / video / static, the leaderboard file, MMVP pairs
scorer.py      a workdir's chosen checkpoint ready to score on the config's mesh
features.py    stage 2b's frozen-tower vectors of the training split, computed once and cached in the workdir
explain.py     one set's heatmaps (models/gradcam.py) drawn over its images; `predict --explain`'s ranked grid
pointing.py    the pointing test: does a target map peak on the shapes its description names
report.py      `evaluate --report`: ranks, the descriptions shown, heatmaps per set, the pointing test
report_page.py the report's plots and its static index.html

Imports, for every module here: each other and `checkpoints`, `data`, `files`, `models`, `parallel`, `runconfig`,
`stages`, `training.step`, `training.inputs`.
"""
