"""The best model of a run: which evaluation was best, its parameters kept apart, and `W/best.json` naming it.

The authors keep the epoch with the best validation accuracy (their best fine-tuned file is epoch 17 of 40), start
stage 2b from it and write the test predictions from the best 2b. A run here does the same: after every evaluation
of `config.best.split`, a row better on `config.best.metric` than the best so far has its parameters written to
`W/best/STEP` (complete on disk first), then `W/best.json` is replaced atomically:

    {"step": 1383, "split": "valid", "metric": "acc", "mode": "max", "value": 0.372, "row": {...the metrics row}}

`--config.init=W` and `evaluate` read the best by default (`weights.run_params`); a resumed run continues from the
latest checkpoint and keeps comparing against the recorded best. A run that never evaluates (stage 1) has no best
file, and readers take its latest checkpoint.

Imports: checkpoint.py only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from contextblip_jax import checkpoint

BEST_FILE = "best.json"
MODES = ("max", "min")
CHOICES = ("best", "latest")
"""Which checkpoint a reader takes: `best`, `latest`, or a step number given as digits."""


@dataclasses.dataclass(frozen=True)
class Criterion:
    """Which evaluation rows compete (`split`) and on what (`metric`, higher is better with mode `max`)."""

    split: str = "valid"
    metric: str = "acc"
    mode: str = "max"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"best.mode must be one of {MODES}, got {self.mode!r}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Criterion:
        return cls(**config.best.to_dict())

    def better(self, value: float, than: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return than is None or (value > than if self.mode == "max" else value < than)


def read(workdir: str) -> dict[str, Any] | None:
    """`W/best.json`, or None when the run has none."""
    path = os.path.join(workdir, BEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_choice(choice: str) -> str:
    """`best`, `latest` or a step number; anything else is an error naming the choices."""
    if choice not in CHOICES and not choice.isdigit():
        raise ValueError(f"checkpoint choice {choice!r} is not one of {CHOICES} or a step number")
    return choice


class BestKeeper:
    """Offered every evaluation row of a run, keeps the best one's parameters and names it in `W/best.json`."""

    def __init__(self, workdir: str, criterion: Criterion):
        self.workdir, self.criterion = workdir, criterion
        recorded = read(workdir)
        same = recorded is not None and all(
            recorded.get(k) == getattr(criterion, k) for k in ("split", "metric", "mode")
        )
        self.value: float | None = recorded["value"] if same else None
        self._params = checkpoint.BestParams(workdir)

    def offer(self, row: Mapping[str, Any], params: Callable[[], Mapping[str, jax.Array]]) -> bool:
        """Keeps `params()` if `row` (a metrics row with `step` and `split`) beats the best so far; True if it did."""
        if row.get("split") != self.criterion.split:
            return False
        if self.criterion.metric not in row:
            raise ValueError(f"best.metric {self.criterion.metric!r} is not in the {row['split']} row: {sorted(row)}")
        value = float(row[self.criterion.metric])
        if not self.criterion.better(value, self.value):
            return False
        self._params.save(int(row["step"]), params())
        self.value = value
        if jax.process_index() == 0:
            record = {"step": int(row["step"]), **dataclasses.asdict(self.criterion), "value": value, "row": dict(row)}
            path = os.path.join(self.workdir, BEST_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(path + ".tmp", path)
        return True

    def close(self) -> None:
        self._params.close()
