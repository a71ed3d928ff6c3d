"""One run per workdir across all of a run's processes: process 0 holds the workdir's lock (`checkpoints.lock`)
and the others learn from it whether it could, before any of them reads or writes the workdir.

Imports: `checkpoints`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np

from contextblip_jax.checkpoints.lock import WorkdirLock, WorkdirLocked


@contextlib.contextmanager
def hold_workdir(workdir: str, stale_after_s: float) -> Iterator[WorkdirLock | None]:
    """The workdir's lock on process 0 (None on the others), released on the way out. Every process raises
    `WorkdirLocked` when process 0 could not take it: the others would otherwise go on into the first collective
    and wait there for a process that has stopped. The heartbeat comes every eighth of `stale_after_s`."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir, stale_after_s, heartbeat_s=stale_after_s / 8).acquire()
        except WorkdirLocked as error:
            refused = error
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not taken and refused is None:
            refused = WorkdirLocked(f"{workdir} is held by another run (process 0 could not take its lock)")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
