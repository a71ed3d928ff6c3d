"""Shared pytest setup: tests import helpers as `tests.<module>`; slow tests are opt-in (`-m slow`).

XLA's persistent compilation cache lives in a fresh folder per session and is inherited by the subprocesses the
trainer tests start: many tests compile the same tiny programs (parameter initialisers, the same train step), and
compiling dominates their time on a CPU.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="contextblip-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
