"""A training run's checkpoints under `W/checkpoints`: the train state, the data iterator's position and the
run's counters in one Orbax step; the newest intact one restored on resume, damaged ones named and set aside.

A checkpoint that fails to read is damaged (truncated or missing arrays, unparsable metadata: set aside, the one
before is tried) or met a storage failure (`storage.is_storage_failure`: unavailable, slow, access refused): that
read is retried with backoff, and if it still fails the run stops naming the checkpoint, with nothing set aside,
so a good checkpoint never gives way to an older one over a passing outage. With several processes, process 0's
list of steps is the one tried, and each step is judged by every process together: it is restored only where all
of them read it, set aside where any found it damaged, and the run stops everywhere when any met a storage
failure. So every process resumes from the same step.

Imports: its own package (`checkpoints`), `files`, `storage`.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from contextblip_jax import files
from contextblip_jax.storage import (
    CheckpointReadError,
    CheckpointWriteError,
    DamagedCheckpointError,
    Shardings,
    is_storage_failure,
    read_failure,
    read_params,
    whole_replica_writes_on_cpu,
)

T = TypeVar("T")

READ_RETRY_DELAYS_S = (2.0, 8.0, 30.0)
"""Waits before each new try of a checkpoint read that met a storage failure: about 40 s in all, past a passing
outage, yet short beside a preempted run's restart. tensorstore and gcsfs retry single requests first."""
ITEMS = ("state", "data", "counters")
"""A step's parts: the train state, the data iterator's position, the run's counters."""
READ, DAMAGED, STORAGE_FAILED = 0, 1, 2
"""What one process made of one checkpoint, as the processes tell each other."""


class RunCheckpoints:
    """A run's checkpoints under `W/checkpoints`: the train state and the data iterator's position, saved
    together in one Orbax step (asynchronously, keeping the newest `keep`), so a resumed run continues the
    same batches. Orbax writes each step to a temporary folder and renames it when complete."""

    def __init__(self, workdir: str, keep: int = 1_000_000):
        import grain

        self._grain = grain
        whole_replica_writes_on_cpu()
        kinds = (ocp.StandardCheckpointHandler, grain.checkpoint.CheckpointHandler, ocp.JsonCheckpointHandler)
        handlers = dict(zip(ITEMS, kinds, strict=True))
        self._manager = ocp.CheckpointManager(
            files.join(files.resolve(workdir), "checkpoints"),
            item_names=tuple(handlers),
            item_handlers={name: handler() for name, handler in handlers.items()},
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )
        # Reads go through the item handlers, not the manager: its restore ends in a barrier of all processes,
        # which a process whose read failed never reaches, so the others would wait there for it. Each process
        # reads on its own here, and the processes agree on the outcome afterwards (`_newest_intact`).
        self._reader = ocp.CompositeCheckpointHandler(**{name: handler() for name, handler in handlers.items()})
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
        restored = self._reader.restore(epath.Path(files.join(self.directory, str(step))), ocp.args.Composite(**items))
        return restored["state"], dict(restored.get("counters") or {})

    def restore_latest(self, abstract_state: object, iterator: object) -> tuple[int, object, dict[str, int]] | None:
        """(step, train state, counters) of the newest checkpoint that reads back whole, `iterator` repositioned
        to it; None when there is no checkpoint. A damaged newer one is named in a warning and moved aside to
        `checkpoints/damaged-STEP-TIME` (kept for inspection; Orbax would otherwise refuse to save that step again
        or count it among the kept ones). When every checkpoint is damaged, `DamagedCheckpointError` says why
        for each, and nothing is moved; a storage failure that outlasts the retries is a `CheckpointReadError`
        naming the checkpoint, and nothing is moved either."""
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
        """(step, what `read` returned, the newer steps found damaged), trying the newest step first; every
        process tries the steps process 0 lists, and each step's outcome is agreed (the module docstring)."""
        failures = []
        for step in _agreed_steps(sorted(self._manager.all_steps(), reverse=True)):
            outcome, value, reason = self._read_retrying(step, read)
            outcomes = _gathered(outcome)
            if STORAGE_FAILED in outcomes:
                where = _processes_with(outcomes, STORAGE_FAILED)
                raise CheckpointReadError(
                    f"checkpoint {step} in {self.directory} could not be read: storage failed{where} after "
                    f"{len(READ_RETRY_DELAYS_S) + 1} tries ({reason or 'on another process'}). Nothing was moved or "
                    "rewound; run the same command again once the storage answers"
                )
            if all(o == READ for o in outcomes):
                return step, value, [failed for failed, _ in failures]
            reason = reason or f"damaged as read by process{_processes_with(outcomes, DAMAGED)}"
            logging.warning("checkpoint %d in %s is damaged (%s); trying an older one", step, self.directory, reason)
            failures.append((step, reason))
        if failures:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise DamagedCheckpointError(
                f"no checkpoint in {self.directory} reads back ({listed}). Nothing was moved or deleted; to start "
                f"this run from scratch, move {self.directory} away"
            )
        return None

    def _read_retrying(self, step: int, read: Callable[[int], T]) -> tuple[int, T | None, str | None]:
        """(outcome, value, reason) of reading `step` here: a storage failure is tried again after each of
        `READ_RETRY_DELAYS_S`; damage is final at once."""
        delays, attempt = iter(READ_RETRY_DELAYS_S), 0
        while True:
            attempt += 1
            try:
                return READ, read(step), None
            except Exception as error:  # Orbax and tensorstore raise many types; each one is classified
                reason = read_failure(error)
                delay = next(delays, None)
                if not is_storage_failure(error) and self._storage_answers(step):
                    return DAMAGED, None, reason
                if delay is None:
                    return STORAGE_FAILED, None, reason
                logging.warning(
                    "reading checkpoint %d in %s: storage failure (%s); try %d of %d again in %.0f s",
                    step,
                    self.directory,
                    reason,
                    attempt,
                    len(READ_RETRY_DELAYS_S) + 1,
                    delay,
                )
                time.sleep(delay)

    def _storage_answers(self, step: int) -> bool:
        """Whether the step's folders can be listed. Damage is only believed where they can: Orbax checks for
        an item with fsspec's `exists`, which answers False for any failure, so an unreachable item looks like a
        missing one (a KeyError), and an outage would pass for damage."""
        folder = files.join(self.directory, str(step))
        try:
            for name in ("", *ITEMS):
                files.list_names(files.join(folder, name) if name else folder)
        except Exception as error:  # the listing's own failure decides: storage, or a folder that is not there
            return not is_storage_failure(error)
        return True

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = files.join(self.directory, f"damaged-{step}-{stamp}")
                files.rename(files.join(self.directory, str(step)), target)
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
        return read_params(files.join(self.directory, str(step), "state"), groups, shardings)

    def close(self) -> None:
        """Waits for the write in flight (`CheckpointWriteError` if it failed) and closes the manager."""
        with self._explaining_write_failure(None):
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()
                self._reader.close()


def _agreed_steps(steps: list[int]) -> list[int]:
    """Process 0's list of steps, on every process (listings of shared storage can differ for a moment)."""
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int64(len(steps))))
    padded = np.zeros(max(count, 1), np.int64)
    padded[: min(count, len(steps))] = steps[:count]
    return [int(step) for step in multihost_utils.broadcast_one_to_all(padded)[:count]]


def _gathered(outcome: int) -> list[int]:
    """Every process's outcome for one step, by process index."""
    if jax.process_count() == 1:
        return [outcome]
    from jax.experimental import multihost_utils

    return [int(o) for o in np.ravel(multihost_utils.process_allgather(np.int32(outcome)))]


def _processes_with(outcomes: list[int], outcome: int) -> str:
    """' on process 1' or ' on processes 0, 2' where several processes run; '' for one."""
    if len(outcomes) == 1:
        return ""
    where = [str(i) for i, o in enumerate(outcomes) if o == outcome]
    return f" on process{'es' if len(where) > 1 else ''} {', '.join(where)}"
