"""Keep freed host memory for reuse: on CPU, XLA allocates each step's scratch buffer afresh (≈300 MB for the
main job), and glibc hands a block that large back to the kernel when it is freed. The next step then faults
every page in again, about 120,000 page faults a second, and the kernel's page zeroing was half of the main
job's CPU time (`top` showed ~50% system time). One arena, no mmap'd blocks and no trimming make glibc reuse
the same memory every step.
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
heap is never given back: the process keeps its high-water mark and reuses it. INT_MAX (2 GiB) was not enough:
a base train step's scratch left a top chunk above it, glibc trimmed it at every free, and every step faulted
2.15 million pages (8.8 GB) in again (6.4-7.0 s of system time per 26 s step on this project's CPU)."""


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
