"""A run's workdir (a local folder or `gs://BUCKET/PATH`): its checkpoints, its best model, its lock, and where a
run's weights come from.

run_state.py  the train state, data position and counters under `W/checkpoints`; resume from the newest intact one
best.py       which evaluation was best (`W/best.json`) and its parameters (`W/best/STEP`)
weights.py    random initialisation, a converted or PyTorch checkpoint (`config.init`), or a run's best or latest
              checkpoint; the architecture file (`W/model_config.json`) that ties a workdir to a model
lock.py       `W/lock.json`: one run writes a workdir at a time; a dead run's lock is taken over

Imports, for every module here: each other and `convert`, `files`, `models`, `parallel`, `runconfig`, `storage`.
"""
