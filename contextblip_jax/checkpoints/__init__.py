"""A run's workdir on disk: its checkpoints, its best model, and where a run's weights come from.

run_state.py  the train state, data position and counters under `W/checkpoints`; resume from the newest intact one
best.py       which evaluation was best (`W/best.json`) and its parameters (`W/best/STEP`)
weights.py    random initialisation, a converted or PyTorch checkpoint (`config.init`), or a run's best or latest
              checkpoint; the architecture file (`W/model_config.json`) that ties a workdir to a model

Imports, for every module here: each other and `convert`, `models`, `parallel`, `runconfig`, `storage`.
"""
