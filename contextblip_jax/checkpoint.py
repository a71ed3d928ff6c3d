"""Orbax storage: converted weights, and a training run's checkpoints.

Converted weights are stored as a flat `{dotted.parameter.path: array}` tree: readable with any Orbax
version, independent of how NNX names list indices, and cheap to restore into an abstract model. A run's
checkpoints hold the train state (flat trainable and frozen dicts, optimizer state, step) and the data
iterator's position.

Parameters are read one of two ways (`Shardings`): straight into the shards a mesh gives them, each process
reading from storage only the slices its own devices hold (what a run starts from), or whole onto the host
(evaluation and prediction on one device, tests).

Imports: Orbax and grain only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

T = TypeVar("T")
Shardings = Mapping[str, jax.sharding.Sharding]
"""Where to read parameters to, by dotted name: those named are read straight into that sharding, in their
stored shape and dtype; any other comes back whole as a host numpy array."""


class CheckpointError(RuntimeError):
    """Checkpoints that cannot be read or written: the run stops with a message saying which and why."""


class DamagedCheckpointError(CheckpointError):
    """Checkpoints exist but none of them can be read: the run stops rather than start again from scratch."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, lost storage): the run stops, naming the folder, rather
    than train on with nothing to resume from. Checkpoints written before stay as they were."""


def read_failure(error: BaseException) -> str:
    """One line naming why stored arrays did not read back: Orbax and tensorstore raise many exception types,
    some with multi-line messages."""
    message = str(error)
    return f"{type(error).__name__}: {message.splitlines()[0][:300] if message else ''}"


def save_params(directory: str, params: Mapping[str, np.ndarray]) -> None:
    """Writes `params` to `directory` (which must not exist yet) and waits until it is on disk."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), dict(params))
        checkpointer.wait_until_finished()


def restore_params(directory: str, shardings: Shardings | None = None) -> dict[str, np.ndarray | jax.Array]:
    """The flat parameter dict `save_params` wrote, in its stored dtypes, read as `shardings` says."""
    path = os.path.abspath(directory)
    handler = ocp.PyTreeCheckpointHandler()  # not a Checkpointer: its `metadata` hides why arrays do not open
    try:
        stored = handler.metadata(epath.Path(path)).tree
    finally:
        handler.close()
    return _read_params(path, stored, shardings)


@functools.cache  # once per process: Orbax logs a warning at every registration
def _whole_replica_writes_on_cpu() -> None:
    """On CPU devices, each array is written from one replica instead of in slices from all of them.

    Orbax's replica-parallel writing slices every replicated array on the device first, and each slice shape is
    a program to compile: the tiny model's first save on 8 simulated CPU devices took 12.9 s, against 0.26 s
    written whole (a CPU copy to host is a memcpy, with nothing to parallelise). Orbax makes the same choice
    for GPUs itself (from `JAX_PLATFORMS`); TPUs keep its default.
    """
    if all(device.platform == "cpu" for device in jax.local_devices()):
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class RunCheckpoints:
    """A run's checkpoints under `W/checkpoints`: the train state and the data iterator's position, saved
    together in one Orbax step (asynchronously, keeping the newest `keep`), so a resumed run continues the
    same batches. Orbax writes each step to a temporary folder and renames it when complete."""

    def __init__(self, workdir: str, keep: int = 1_000_000):
        import grain

        self._grain = grain
        _whole_replica_writes_on_cpu()
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
        with self._naming_write_failures(step):
            self._manager.save(step, args=args, force=True)
        self._writing = step

    @contextlib.contextmanager
    def _naming_write_failures(self, step: int | None) -> Iterator[None]:
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
        return _read_params(os.path.join(self.directory, str(step), "state"), groups, shardings)

    def close(self) -> None:
        """Waits for the write in flight (`CheckpointWriteError` if it failed) and closes the manager."""
        with self._naming_write_failures(None):
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()


class BestParams:
    """The parameters of a run's best evaluation so far, under `W/best/STEP` (`best.py` decides which is best and
    names it in `W/best.json`). Kept apart from the run's checkpoints so that `keep_checkpoints` never deletes it;
    the two newest are kept, so the one `best.json` names survives a kill between a save and that file's update."""

    def __init__(self, workdir: str):
        _whole_replica_writes_on_cpu()
        self._manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), BEST_DIR),
            item_names=("params",),
            item_handlers={"params": ocp.StandardCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False),
        )

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def save(self, step: int, params: Mapping[str, object]) -> None:
        """Writes `params` (flat, possibly sharded) as step `step` and returns once it is complete on disk."""
        with _naming_write_errors(self.directory, step):
            self._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(dict(params))), force=True)
            self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_params(self, step: int, shardings: Shardings | None = None) -> dict[str, np.ndarray | jax.Array]:
        """The parameters saved at `step`, read as `shardings` says whatever mesh wrote them."""
        stored = self._manager.item_metadata(step)["params"]
        return _read_params(os.path.join(self.directory, str(step), "params"), stored, shardings)

    def close(self) -> None:
        self._manager.close()


BEST_DIR = "best"


@contextlib.contextmanager
def _naming_write_errors(directory: str, step: int) -> Iterator[None]:
    try:
        yield
    except Exception as error:  # Orbax and tensorstore raise many types for a failed write
        raise CheckpointWriteError(f"writing step {step} to {directory} failed: {read_failure(error)}") from error


def _read_params(item: str, stored: Mapping[str, Any], shardings: Shardings | None) -> dict[str, Any]:
    """The arrays `stored` describes (part of the metadata tree of the Orbax item at `item`, each array under
    its dotted name) and no other array of that item, by name: each one named in `shardings` read straight into
    its shards, each process reading only the slices its devices hold; the others whole onto this process's
    first device, then to the host."""
    shardings = shardings or {}
    whole = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(path: tuple, stored: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(stored.shape, stored.dtype, sharding=shardings.get(path[-1].key, whole))

    targets = jax.tree_util.tree_map_with_path(target, dict(stored))
    restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            item, args=ocp.args.PyTreeRestore(item=targets, restore_args=restore_args, partial_restore=True)
        )
    return {
        path[-1].key: value if path[-1].key in shardings else np.asarray(value)
        for path, value in jax.tree_util.tree_leaves_with_path(restored)
    }
