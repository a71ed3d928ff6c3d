"""`--profile=DIR`: one traced call of the JAX step (`jax.profiler`, with a Perfetto trace for any viewer) and a row
that says where its time went: milliseconds per kind of XLA operation, summed over the call's threads.

On a CPU, XLA's per-operation events exist only with `--xla_cpu_enable_xprof_traceme=true`, which `enable_op_events`
adds before the backend starts. Kinds are the operation names without their numbering (`ynn_fusion.420` counts as
`ynn_fusion`: a matrix product handed to YNNPACK; `dot`: one XLA emits itself). Operations on different threads
may overlap, so the kinds can add up to more than the call's wall time.

Imports: its own package (`benchmark`) only.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_RUNTIME = re.compile(r"^\$|Thunk|Pjit|ParseArguments|ThreadPool|PjRt|^end: ")
"""Events of the runtime and of Python around the operations, which would count the operations' time twice."""


def enable_op_events() -> None:
    """Adds the CPU per-operation events flag to XLA_FLAGS; call it before anything starts JAX's backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if TRACEME_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TRACEME_FLAG}".strip()


def op_kinds(trace_path: str) -> Counter:
    """Milliseconds per operation kind in a Perfetto JSON trace (gzip), runtime and Python events left out."""
    with gzip.open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kinds: Counter = Counter()
    for event in events:
        if event.get("ph") == "X" and not _RUNTIME.search(event["name"]):
            kinds[re.sub(r"\.\d+$", "", event["name"])] += event["dur"] / 1000.0
    return kinds


def profile_row(call: Callable[[], Any], folder: str, top: int = 12) -> dict[str, Any]:
    """Traces one call into `folder` and returns the row: wall time, the `top` kinds and their shares."""
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        start = time.perf_counter()
        jax.block_until_ready(call())
        wall_s = time.perf_counter() - start
    traces = sorted(glob.glob(os.path.join(folder, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not traces:
        raise FileNotFoundError(f"jax.profiler wrote no Perfetto trace under {folder}")
    kinds = op_kinds(traces[-1])
    total = sum(kinds.values())
    return {
        "framework": "jax",
        "measure": "profile",
        "trace": traces[-1],
        "call_s": round(wall_s, 4),
        "ops_ms": round(total, 1),
        "top_ops": [
            {"op": name, "ms": round(ms, 1), "share": round(ms / total, 4)} for name, ms in kinds.most_common(top)
        ],
    }
