"""Freed host memory is reused: after `keep_freed_memory`, repeating a jitted step faults no pages in."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys

import pytest

from tests.runs import user_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP = """
import resource, sys
import jax, jax.numpy as jnp
from contextblip_jax.training import hostmem
kept = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else False
rows, columns, steps = (int(arg) for arg in sys.argv[2:])
step = jax.jit(lambda x: jnp.tanh(x @ x.T @ x).sum())
x = jnp.ones((rows, columns), jnp.float32)
step(x).block_until_ready()
faults = []
for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""


def faults_per_step(mode: str, rows: int = 3000, columns: int = 400, steps: int = 9) -> tuple[str, list[int]]:
    """Whether the settings took, and the pages each repeated step faulted in; the step's scratch is the
    `rows` x `rows` float32 product x @ x.T."""
    result = subprocess.run(
        [sys.executable, "-c", STEP, mode, str(rows), str(columns), str(steps)],
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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_a_scratch_larger_than_2_gib_is_kept_too():
    # x @ x.T is 2.3 GB here. A trim threshold of INT_MAX (2 GiB), what the settings were before, let glibc give
    # the heap's top back after every step: the base train step faulted 2.15 million pages in per step.
    kept, faults = faults_per_step("keep", rows=24_000, columns=8, steps=5)
    assert kept == "True"
    assert statistics.median(faults) < 50, faults
