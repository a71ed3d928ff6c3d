"""Preemption: SIGTERM turned into a flag the training loop checks between steps, agreed on by every process.

Imports: its own package (`training`) only.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class Preempted:
    """Turns SIGTERM into a flag the loop checks between steps, so the step in flight finishes and is saved.

    With several processes, `jax.distributed` catches SIGTERM itself and its preemption service picks the step at
    which every process stops and saves (one past the furthest any process had reached), even when only some of
    them received the signal. Only the main thread may install signal handlers; elsewhere (a test thread)
    preemption of a single process is not watched."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def agreed(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every process; call it at every step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
