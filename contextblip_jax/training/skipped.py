"""Damaged training examples skipped under `data.on_error="skip"`: counted over every host, kept across resumes.

The transforms mark each training example with how many damaged ones it stands in for (`skipped`). The trainer
takes that field off each host batch before the step and adds it here; its train rows report the run's total
(`skipped_examples`) and each checkpoint stores it, so a resumed run's count includes the skips before the
interruption, not just those since.

Imports: its own package (`training`), `data`.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import jax
import numpy as np

from contextblip_jax.data.errors import SKIPPED_FIELD

METRIC = "skipped_examples"


class SkipCount:
    def __init__(self, before: int = 0):
        self.before = before  # the total stored in the checkpoint this run resumed from
        self._here = 0  # this process's skips since it started

    def take(self, batch: MutableMapping[str, np.ndarray]) -> MutableMapping[str, np.ndarray]:
        """`batch` without its `skipped` field, which is counted."""
        self._here += int(np.sum(batch.pop(SKIPPED_FIELD, 0)))
        return batch

    def total(self) -> int:
        """The run's skips over all hosts. With several processes this is a collective: every process must ask
        at the same steps (the trainer asks at log and checkpoint steps, which all processes share)."""
        here = np.int64(self._here)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            here = np.sum(multihost_utils.process_allgather(here))
        return self.before + int(here)
