"""`python -m contextblip_jax.train --config=configs/X.py --workdir=W`: the trainer (DESIGN.md contract 3).

Not built yet: it arrives with the training issue. Until then this entry point says so and exits non-zero, so
that no script mistakes it for a finished run.
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("config", None, "ml_collections config file, e.g. configs/synthetic.py[:args].")
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl and plots.")


def main(argv: list[str]) -> None:
    del argv
    sys.exit(
        "contextblip_jax.train is not available yet: training arrives with the issue 'Training and evaluation' "
        "(configs, sharded train step, Orbax checkpoints). What works today: BLIP weight conversion and the "
        "Flax BLIP towers; see README.md."
    )


if __name__ == "__main__":
    app.run(main)
