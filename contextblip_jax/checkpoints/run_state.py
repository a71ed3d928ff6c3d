"""A training run's checkpoints under `W/checkpoints`: the train state, the data iterator's position and the
run's counters in one Orbax step; the newest intact one restored on resume, damaged ones named and set aside.

Imports: its own package (`checkpoints`), `storage`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from contextblip_jax.storage import (
    CheckpointWriteError,
    DamagedCheckpointError,
    Shardings,
    read_failure,
    read_params,
    whole_replica_writes_on_cpu,
)

T = TypeVar("T")


class RunCheckpoints:
    """A run's checkpoints under `W/checkpoints`: the train state and the data iterator's position, saved
    together in one Orbax step (asynchronously, keeping the newest `keep`), so a resumed run continues the
    same batches. Orbax writes each step to a temporary folder and renames it when complete."""

    def __init__(self, workdir: str, keep: int = 1_000_000):
        import grain

        self._grain = grain
        whole_replica_writes_on_cpu()
        self._manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            item_names=("state", "data", "counters"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "counters": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )
        self._writing: int | None = None  # the step last handed to Orbax, for error messages

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: object, iterator: object, counters: Mapping[str, int] | None = None) -> None:
        """Starts writing step `step`; `counters` are run totals a resumed run continues (e.g. skipped examples).

        The write finishes in the background; its failure surfaces at the next `save` or at `close` as a
        `CheckpointWriteError`."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=self._grain.checkpoint.CheckpointSave(iterator),
            counters=ocp.args.JsonSave(dict(counters or {})),
        )
        with self._explaining_write_failure(step):
            self._manager.save(step, args=args, force=True)
        self._writing = step

    @contextlib.contextmanager
    def _explaining_write_failure(self, step: int | None) -> Iterator[None]:
        """Turns Orbax's and tensorstore's many write errors into one message: the folder, the steps concerned,
        the newest complete checkpoint (untouched: Orbax renames a step into place only once it is whole) and,
        for a full disk, what to do."""
        try:
            yield
        except Exception as error:  # tensorstore reports a full disk as ValueError("RESOURCE_EXHAUSTED ...")
            reason = read_failure(error)
            steps = sorted({s for s in (self._writing, step) if s is not None})
            full = "No space left on device" in str(error) or getattr(error, "errno", None) == errno.ENOSPC
            advice = "free space on that storage" if full else "fix the storage"
            self._manager.reload()
            kept = self._manager.latest_step()
            kept_text = "no checkpoint is complete" if kept is None else f"checkpoint {kept} is the newest complete one"
            raise CheckpointWriteError(
                f"writing checkpoint {' or '.join(map(str, steps))} to {self.directory} failed"
                f"{' (no space left on device)' if full else ''}: {reason}. {kept_text}; {advice} and run the same "
                "command to resume from it"
            ) from error

    def restore(self, step: int, abstract_state: object, iterator: object) -> tuple[object, dict[str, int]]:
        """The train state at `step` (laid out as `abstract_state`'s shardings) and the run's counters; `iterator`
        is repositioned. Checkpoints written before counters were stored give `{}`."""
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "data": self._grain.checkpoint.CheckpointRestore(iterator),
        }
        if "counters" in self._manager.item_metadata(step):
            items["counters"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored.get("counters") or {})

    def restore_latest(self, abstract_state: object, iterator: object) -> tuple[int, object, dict[str, int]] | None:
        """(step, train state, counters) of the newest checkpoint that reads back whole, `iterator` repositioned
        to it; None
        when there is no checkpoint. A damaged newer one is named in a warning and moved aside to
        `checkpoints/damaged-STEP-TIME` (kept for inspection; Orbax would otherwise refuse to save that step again
        or count it among the kept ones). When every checkpoint is damaged, `DamagedCheckpointError` says why
        for each, and nothing is moved."""
        found = self._newest_intact(lambda step: self.restore(step, abstract_state, iterator))
        if found is not None and found[2]:
            self._set_aside(found[2])
        return None if found is None else (found[0], *found[1])

    def latest_params(self, shardings: Shardings | None = None) -> tuple[int, dict[str, np.ndarray | jax.Array]] | None:
        """(step, parameters) of the newest checkpoint whose parameters read back (`restore_params`), None when
        there is no checkpoint; damaged newer ones are named in a warning and left where they are (this reads
        another run's workdir)."""
        found = self._newest_intact(lambda step: self.restore_params(step, shardings))
        return None if found is None else found[:2]

    def _newest_intact(self, read: Callable[[int], T]) -> tuple[int, T, list[int]] | None:
        """(step, what `read` returned, the newer steps that failed), trying the newest step first."""
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                return step, read(step), [failed for failed, _ in failures]
            except Exception as error:  # Orbax and tensorstore raise many types; each one is reported
                reason = read_failure(error)
                logging.warning(
                    "checkpoint %d in %s is damaged (%s); trying an older one", step, self.directory, reason
                )
                failures.append((step, reason))
        if failures:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise DamagedCheckpointError(
                f"no checkpoint in {self.directory} reads back ({listed}). Nothing was moved or deleted; to start "
                f"this run from scratch, move {self.directory} away"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = os.path.join(self.directory, f"damaged-{step}-{stamp}")
                os.rename(os.path.join(self.directory, str(step)), target)
                logging.warning("moved the damaged checkpoint %d to %s", step, target)
        ocp.multihost.sync_global_processes("contextblip_damaged_checkpoints_moved")
        self._manager.reload()

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_params(self, step: int, shardings: Shardings | None = None) -> dict[str, np.ndarray | jax.Array]:
        """Every parameter saved at `step` (trainable and frozen, by dotted path), read as `shardings` says
        whatever mesh wrote them, and nothing else (not the optimizer state): what the next stage starts from,
        and what evaluation and prediction score with."""
        stored = self._manager.item_metadata(step)["state"]
        groups = {group: stored[group] for group in ("trainable", "frozen")}
        return read_params(os.path.join(self.directory, str(step), "state"), groups, shardings)

    def close(self) -> None:
        """Waits for the write in flight (`CheckpointWriteError` if it failed) and closes the manager."""
        with self._explaining_write_failure(None):
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()
