"""Freed host memory is reused: after `keep_freed_memory`, repeating a jitted step faults no pages in."""

from __future__ import annotations

import os
import platform
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
x = jnp.ones((1500, 500), jnp.float32)
step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step(x).block_until_ready()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_step(mode: str) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", STEP, mode],
        cwd=ROOT,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    kept, faults = result.stdout.split()
    return kept, float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_repeated_steps_reuse_their_scratch_memory():
    kept, faults = faults_per_step("keep")
    _, default_faults = faults_per_step("default")
    assert kept == "True"
    # glibc's default faults 600-1,300 pages in per step on the project's machine (it varies with the load)
    assert default_faults > 200 and faults < 50, (faults, default_faults)
