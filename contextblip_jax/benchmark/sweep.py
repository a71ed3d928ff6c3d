"""Scaling sweeps of the benchmark, each point in its own process, so that a point that runs out of memory or
time ends the sweep with a reason instead of taking the sweep down with it.

- `descriptions`: 1, 2, 4, 8, ... descriptions per step on the host's devices, every framework of `--compare`,
  until a point fails or passes the largest size asked for.
- `devices`: 1, 2, 4, 8, ... simulated host devices (XLA's `--xla_force_host_platform_device_count`), each with the
  same descriptions (weak scaling), JAX only: its rows gain `efficiency_vs_linear`, the throughput over the one-device
  throughput times the device count. Simulated devices share the host's cores, so on a CPU this measures what the
  sharded program costs over the unsharded one, not a cluster's scaling.

Every row is one JSON object with `sweep` (the kind) and `sweep_value` (descriptions or devices); a point that
failed is a row with `failure` (the child's last error line, or the time limit).

Imports: its own package (`benchmark`) only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

KINDS = ("descriptions", "devices")


def doubling(largest: int) -> list[int]:
    """1, 2, 4, ... up to `largest` (included when it is a power of two)."""
    values, value = [], 1
    while value <= largest:
        values.append(value)
        value *= 2
    return values


def child_environment(devices: int | None) -> dict[str, str]:
    """This process's environment, with `devices` simulated host devices when given."""
    environment = dict(os.environ)
    if devices is not None:
        flags = [f for f in environment.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        environment["XLA_FLAGS"] = " ".join(flags)
        environment["JAX_PLATFORMS"] = "cpu"
    return environment


def failure_line(stderr: str) -> str:
    """The child's last line that reads as an error, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "Killed" in line]
    return (errors or lines or ["no output"])[-1][:500]


def run_point(flags: Sequence[str], devices: int | None, timeout_s: float) -> tuple[list[dict[str, Any]], str | None]:
    """One `python -m contextblip_jax.benchmark` process: (its rows, None) or (whatever it printed, why it failed)."""
    command = [sys.executable, "-m", "contextblip_jax.benchmark", *flags]
    logging.info("sweep point: %s%s", " ".join(flags), f" on {devices} devices" if devices else "")
    try:
        done = subprocess.run(
            command, env=child_environment(devices), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        return _rows(out), f"past the point's time limit of {timeout_s:.0f} s (--sweep_point_s)"
    rows = _rows(done.stdout)
    if done.returncode != 0:
        return rows, f"exit status {done.returncode}: {failure_line(done.stderr)}"
    return rows, None


def _rows(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def sweep(
    kind: str,
    flags: Sequence[str],
    values: Sequence[int],
    descriptions: int,
    timeout_s: float,
    point: Callable[[Sequence[str], int | None, float], tuple[list[dict[str, Any]], str | None]] = run_point,
) -> list[dict[str, Any]]:
    """The rows of every point of a `kind` sweep over `values`, stopping after the first failed point.

    `flags` are the benchmark's flags without `--descriptions`; a devices point runs `descriptions` per device."""
    if kind not in KINDS:
        raise ValueError(f"sweep {kind!r} unknown; choose from {KINDS}")
    rows: list[dict[str, Any]] = []
    for value in values:
        count = value if kind == "descriptions" else descriptions * value
        devices = value if kind == "devices" else None
        got, failure = point([*flags, f"--descriptions={count}"], devices, timeout_s)
        tag = {"sweep": kind, "sweep_value": value}
        rows.extend({**row, **tag} for row in got)
        if failure:
            logging.warning("sweep %s stops at %d: %s", kind, value, failure)
            rows.append({**tag, "failure": failure})
            break
    if kind == "devices":
        add_efficiency(rows)
    return rows


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    """`efficiency_vs_linear` on each JAX row of a devices sweep: images/s over (1-device images/s x devices)."""
    jax_rows = [row for row in rows if row.get("framework") == "jax"]
    one = next((row for row in jax_rows if row["sweep_value"] == 1), None)
    for row in jax_rows:
        if one is not None:
            row["efficiency_vs_linear"] = round(row["images_per_s"] / (one["images_per_s"] * row["sweep_value"]), 4)
