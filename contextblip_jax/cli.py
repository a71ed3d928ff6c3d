"""What every command shares: a console for a person, and one `error:` line for a user's mistake.

Libraries log at INFO through absl (Orbax alone writes dozens of lines per checkpoint: handler registries, thread
joins, write ratios); a person running the main job wants the project's own start-up summary, progress and
evaluations, and every warning. So INFO records from outside this package are dropped unless `--verbosity=1`
(absl's flag) asks for them. A mistake a user can fix (a bad path, a foreign data folder, a bad config value)
ends the command with `error: ...` on stderr and exit status 2, not a traceback.

Imports: `storage` (its error types are a user's to fix).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from contextblip_jax import storage

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, storage.CheckpointError)
"""Exceptions that mean the user gave something wrong or missing: reported in one line, exit status 2."""

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _ProjectInfoOnly(logging.Filter):
    """Passes warnings and errors from anywhere, and INFO and below only from this package's own files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def quiet_libraries() -> None:
    """Drops other libraries' INFO lines from the console, unless `--verbosity` is 1 or more."""
    if flags.FLAGS.verbosity >= 1:
        return
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _ProjectInfoOnly) for f in handler.filters):
        handler.addFilter(_ProjectInfoOnly())


def fail(error: BaseException) -> None:
    """Ends the command for a user's mistake: one `error:` line on stderr, exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[list[str]], None], required: Sequence[str] = ()) -> None:
    """Runs a command's `main` under absl with the libraries' INFO lines quiet and user mistakes told in one line;
    the entry point of `python -m contextblip_jax.X` and of the `contextblip-X` console scripts."""
    if required:
        flags.mark_flags_as_required(list(required))
    if main.__module__ != "__main__":  # a console script: `--help` lists the flags of the program it names
        for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def quiet_main(argv: list[str]) -> None:
        quiet_libraries()
        try:
            main(argv)
        except USER_ERRORS as error:
            fail(error)

    app.run(quiet_main)
