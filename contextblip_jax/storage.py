"""Orbax storage of flat `{dotted.parameter.path: array}` trees, and the errors of reading and writing them.

Converted weights, a run's best parameters and the parameter part of its checkpoints are all such trees: readable
with any Orbax version, independent of how NNX names list indices, and cheap to restore into an abstract model.
They are read one of two ways (`Shardings`): straight into the shards a mesh gives them, each process reading from
storage only the slices its own devices hold (what a run starts from), or whole onto the host (evaluation and
prediction on one device, tests).

Imports: `files`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from contextblip_jax import files

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


class CheckpointReadError(CheckpointError):
    """A checkpoint could not be read for a reason that says nothing about the checkpoint (storage unavailable or
    slow, access refused): the run stops naming it, after retrying, and nothing is set aside or rewound."""


TRANSIENT_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|PERMISSION_DENIED|UNAUTHENTICATED)\b")
"""tensorstore's status codes (the first word of its error messages) for failures of the storage, not the data:
it reports HTTP 5xx, 408 and 429 as UNAVAILABLE once its own retries are spent, and 401 / 403 as the last two."""
TRANSIENT_HTTP = frozenset({401, 403, 408, 429, 500, 502, 503, 504})
"""HTTP statuses of a storage failure, as gcsfs reports them (an error's `code`)."""
TRANSIENT_ERRNO = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EAGAIN})
"""Local (NFS, gcsfuse) errors of a storage failure; ESTALE is added where the platform has it."""
if hasattr(errno, "ESTALE"):
    TRANSIENT_ERRNO = TRANSIENT_ERRNO | {errno.ESTALE}


def is_storage_failure(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) says the storage failed (unavailable, slow, access refused)
    rather than that what it holds is damaged: such a checkpoint is retried, never set aside. Anything not
    recognised counts as damage, as a truncated array, a missing file or unparsable metadata do."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError | TimeoutError | PermissionError | files.StorageError):
            return True
        if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNO:
            return True
        if getattr(error, "code", None) in TRANSIENT_HTTP:
            return True
        if any(kind.__name__ == "ClientConnectionError" for kind in type(error).__mro__):  # aiohttp's, under gcsfs
            return True
        if TRANSIENT_STATUS.match(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def read_failure(error: BaseException) -> str:
    """One line naming why stored arrays did not read back: Orbax and tensorstore raise many exception types,
    some with multi-line messages."""
    message = str(error)
    return f"{type(error).__name__}: {message.splitlines()[0][:300] if message else ''}"


def save_params(directory: str, params: Mapping[str, np.ndarray]) -> None:
    """Writes `params` to `directory` (which must not exist yet) and waits until it is on disk."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(files.resolve(directory), dict(params))
        checkpointer.wait_until_finished()


def restore_params(directory: str, shardings: Shardings | None = None) -> dict[str, np.ndarray | jax.Array]:
    """The flat parameter dict `save_params` wrote, in its stored dtypes, read as `shardings` says."""
    path = files.resolve(directory)
    handler = ocp.PyTreeCheckpointHandler()  # not a Checkpointer: its `metadata` hides why arrays do not open
    try:
        stored = handler.metadata(epath.Path(path)).tree
    finally:
        handler.close()
    return read_params(path, stored, shardings)


@functools.cache  # once per process: Orbax logs a warning at every registration
def whole_replica_writes_on_cpu() -> None:
    """On CPU devices, each array is written from one replica instead of in slices from all of them.

    Orbax's replica-parallel writing slices every replicated array on the device first, and each slice shape is
    a program to compile, which makes a first save on several CPU devices many times slower than writing each
    array whole (a CPU copy to host is a memcpy, with nothing to parallelise). Orbax makes the same choice
    for GPUs itself (from `JAX_PLATFORMS`); TPUs keep its default.
    """
    if all(device.platform == "cpu" for device in jax.local_devices()):
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


@contextlib.contextmanager
def write_errors_named(directory: str, step: int) -> Iterator[None]:
    """Any failure of writing `step` to `directory` as one `CheckpointWriteError` naming both."""
    try:
        yield
    except Exception as error:  # Orbax and tensorstore raise many types for a failed write
        raise CheckpointWriteError(f"writing step {step} to {directory} failed: {read_failure(error)}") from error


def read_params(item: str, stored: Mapping[str, Any], shardings: Shardings | None) -> dict[str, Any]:
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
