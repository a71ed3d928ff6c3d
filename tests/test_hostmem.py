"""Freed host memory is reused: after `keep_freed_memory`, repeating a jitted step faults no pages in."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys

import pytest

from tests.runs import user_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = """
import resource, sys
import jax, jax.numpy as jnp
from contextblip_jax import hostmem
kept = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else False
step = jax.jit(lambda x: jnp.tanh(x @ x.T @ x).sum())
x = jnp.ones((3000, 400), jnp.float32)
step(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def faults_per_step(mode: str) -> tuple[str, list[int]]:
    """Whether the settings took, and the pages each of nine repeated steps faulted in."""
    result = subprocess.run(
        [sys.executable, "-c", STEP, mode],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    kept, *faults = result.stdout.split()
    return kept, [int(count) for count in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_repeated_steps_reuse_their_scratch_memory():
    kept, faults = faults_per_step("keep")
    _, default_faults = faults_per_step("default")
    assert kept == "True"
    # x @ x.T is 36 MB, above the 32 MB to which glibc's default raises its mmap threshold as blocks are freed,
    # so by default every step maps it afresh and faults its ~8,800 pages in. A one-off growth of the heap or a
    # new thread's stack can land in any one step: the median is what repeats.
    assert statistics.median(default_faults) > 5000, default_faults
    assert statistics.median(faults) < 50, faults
