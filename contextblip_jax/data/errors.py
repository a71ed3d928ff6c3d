"""Bad input: one error type that names the file and the image set, and the raise-or-skip policy for it.

Datasets of 100k files always hold a few damaged ones. `on_error="raise"` (the default) stops at the first
with a message a user can act on; `on_error="skip"` (`config.data.on_error`) drops the damaged examples and
counts them in the logs, so that nothing is silently wrong either way.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import collections
import dataclasses

from absl import logging

ON_ERROR = ("raise", "skip")
_LOGGED_INDIVIDUALLY = 20  # warnings per policy before only the final summary counts further skips


class DataError(ValueError):
    """A damaged input: `path` is the file, `set_name` the image set (or caption entry), `problem` what is wrong."""

    def __init__(self, path: str, problem: str, set_name: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.set_name = set_name
        where = f"{self.path} [set {set_name}]" if set_name is not None else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keeps the fields when the error crosses a grain worker process
        return (DataError, (self.path, self.problem, self.set_name))


UNREADABLE = "unreadable"
SKIPPED_FIELD = "skipped"
"""Training batches' count of the damaged examples each example stands in for (see `transforms.Prepare`)."""


def unreadable_record(example_id: int, error: DataError) -> dict:
    """The element a source yields for an example whose files it cannot read (e.g. deleted during a run).

    grain reads sources outside the per-example transform, where the raise-or-skip policy lives, so sources
    hand the error on instead of raising it; `check_readable` raises it inside the transform."""
    return {"example_id": example_id, UNREADABLE: error}


def check_readable(element: dict) -> dict:
    if UNREADABLE in element:
        raise element[UNREADABLE]
    return element


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


@dataclasses.dataclass
class ErrorPolicy:
    """Raises a `DataError` or, with `on_error="skip"`, counts it (by problem) and logs it.

    `what` says what the reader was reading (a file, a split) so the final summary line is self-contained.
    """

    on_error: str
    what: str
    skipped: int = 0
    problems: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self):
        check_on_error(self.on_error)

    def handle(self, error: DataError, examples: int = 1) -> None:
        """Raise `error`, or record that `examples` examples were dropped because of it."""
        if self.on_error == "raise":
            raise error
        self.skipped += examples
        self.problems[error.problem.split(":")[0]] += examples
        if sum(self.problems.values()) - examples < _LOGGED_INDIVIDUALLY:
            logging.warning("skipping %d example(s): %s", examples, error)

    def log_summary(self) -> None:
        if self.skipped:
            kinds = ", ".join(f"{count} × {kind}" for kind, count in self.problems.most_common())
            logging.warning("%s: skipped %d damaged example(s) (%s)", self.what, self.skipped, kinds)
