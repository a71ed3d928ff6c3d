"""The best model of a run: which evaluation was best, its parameters kept apart, and `W/best.json` naming it.

The authors keep the epoch with the best validation accuracy (their best fine-tuned file is epoch 17 of 40), start
stage 2b from it and write the test predictions from the best 2b. A run here does the same: after every evaluation
of `config.best.split`, a row better on `config.best.metric` than the best so far has its parameters written to
`W/best/STEP` (complete on disk first), then `W/best.json` is replaced atomically:

    {"step": 1383, "split": "valid", "metric": "acc", "mode": "max", "value": 0.372, "row": {...the metrics row}}

`--config.init=W` and `evaluate` read the best by default (`weights.run_params`); a resumed run continues from the
latest checkpoint and keeps comparing against the recorded best. A run that never evaluates (stage 1) has no best
file, and readers take its latest checkpoint.

Imports: its own package (`checkpoints`), `files`, `storage`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from contextblip_jax import files
from contextblip_jax.storage import Shardings, read_params, whole_replica_writes_on_cpu, write_errors_named

BEST_FILE = "best.json"
BEST_DIR = "best"
"""`W/best/STEP`: the parameters of the best evaluations, apart from the run's checkpoints."""


@dataclasses.dataclass(frozen=True)
class Criterion:
    """Which evaluation rows compete (`split`) and on what (`metric`, higher is better with mode `max`)."""

    split: str = "valid"
    metric: str = "acc"
    mode: str = "max"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Criterion:
        return cls(**config.best.to_dict())

    def better(self, value: float, than: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return than is None or (value > than if self.mode == "max" else value < than)


def read(workdir: str) -> dict[str, Any] | None:
    """`W/best.json`, or None when the run has none."""
    path = files.join(workdir, BEST_FILE)
    if not files.exists(path):
        return None
    return json.loads(files.read_text(path))


class BestKeeper:
    """Offered every evaluation row of a run, keeps the best one's parameters and names it in `W/best.json`."""

    def __init__(self, workdir: str, criterion: Criterion):
        self.workdir, self.criterion = workdir, criterion
        recorded = read(workdir)
        same = recorded is not None and all(
            recorded.get(k) == getattr(criterion, k) for k in ("split", "metric", "mode")
        )
        self.value: float | None = recorded["value"] if same else None
        self.row: dict[str, Any] | None = recorded["row"] if same else None
        """The best row so far, as `W/best.json` records it (None before the first evaluation)."""
        self._params = BestParams(workdir)

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
        self.value, self.row = value, dict(row)
        if jax.process_index() == 0:
            record = {"step": int(row["step"]), **dataclasses.asdict(self.criterion), "value": value, "row": dict(row)}
            files.write_text(files.join(self.workdir, BEST_FILE), json.dumps(record, indent=1))
        return True

    def close(self) -> None:
        self._params.close()


class BestParams:
    """The parameters of a run's best evaluation so far, under `W/best/STEP` (`BestKeeper` decides which is best and
    names it in `W/best.json`). Kept apart from the run's checkpoints so that `keep_checkpoints` never deletes it;
    the two newest are kept, so the one `best.json` names survives a kill between a save and that file's update."""

    def __init__(self, workdir: str):
        whole_replica_writes_on_cpu()
        self._manager = ocp.CheckpointManager(
            files.join(files.resolve(workdir), BEST_DIR),
            item_names=("params",),
            item_handlers={"params": ocp.StandardCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False),
        )

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def save(self, step: int, params: Mapping[str, object]) -> None:
        """Writes `params` (flat, possibly sharded) as step `step` and returns once it is complete on disk."""
        with write_errors_named(self.directory, step):
            self._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(dict(params))), force=True)
            self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_params(self, step: int, shardings: Shardings | None = None) -> dict[str, np.ndarray | jax.Array]:
        """The parameters saved at `step`, read as `shardings` says whatever mesh wrote them."""
        stored = self._manager.item_metadata(step)["params"]
        return read_params(files.join(self.directory, str(step), "params"), stored, shardings)

    def close(self) -> None:
        self._manager.close()
