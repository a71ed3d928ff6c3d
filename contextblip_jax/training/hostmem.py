"""Keep freed host memory for reuse: on CPU, XLA allocates each step's scratch buffer afresh, and glibc hands a
block that large back to the kernel when it is freed. The next step then faults every page in again, and the
kernel zeroing those pages can take a large share of a CPU step's time. One arena, no mmap'd blocks and no
trimming make glibc reuse the same memory every step (`tests/training/test_hostmem.py` counts the faults).

Imports: its own package (`training`) only.
"""

from __future__ import annotations

import ctypes
import platform

from absl import logging

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1
"""mallopt takes a C int, but glibc stores the trim threshold as a size_t: -1 becomes SIZE_MAX, so the top of the
heap is never given back: the process keeps its high-water mark and reuses it. A smaller threshold such as INT_MAX
is not enough: a base train step's scratch exceeds 2 GiB, so glibc would trim it at every free and the next step
would fault it all in again."""


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep and reuse freed memory; a no-op elsewhere. Call it before JAX starts its
    threads (they would otherwise get arenas of their own). Returns whether the settings took."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
    applied = all(mallopt(option, value) == 1 for option, value in settings)
    if not applied:
        logging.warning("glibc rejected the malloc settings; every step will fault its scratch memory in again")
    return applied
