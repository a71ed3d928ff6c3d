"""Sweeps run each point in its own process, stop at the first failed point with its reason, and plot what they got."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from contextblip_jax.benchmark import plots, sweep
from tests.runs import ROOT


def fake_point(failing_at: int | None = None, devices_seen: list | None = None):
    """A point that returns a JAX row whose images/s grow by 1.5x per doubling, failing at `failing_at` descriptions."""

    def point(flags, devices, timeout_s):
        count = int(next(f for f in flags if f.startswith("--descriptions=")).split("=")[1])
        if devices_seen is not None:
            devices_seen.append(devices)
        if count == failing_at:
            return [], "exit status 1: RESOURCE_EXHAUSTED: out of memory"
        rows = [{"framework": "jax", "images_per_s": 10.0 * 1.5 ** (count.bit_length() - 1), "descriptions": count}]
        return [*rows, {"framework": "torch", "images_per_s": 8.0, "descriptions": count}], None

    return point


def test_doubling_lists_powers_of_two_up_to_the_largest():
    assert sweep.doubling(8) == [1, 2, 4, 8]
    assert sweep.doubling(12) == [1, 2, 4, 8]
    assert sweep.doubling(1) == [1]


def test_a_descriptions_sweep_stops_after_the_first_failed_point_and_says_why():
    rows = sweep.sweep("descriptions", ["--preset=tiny"], [1, 2, 4, 8, 16], 2, 60.0, point=fake_point(failing_at=8))
    assert [r["sweep_value"] for r in rows if r.get("framework") == "jax"] == [1, 2, 4]
    assert rows[-1] == {"sweep": "descriptions", "sweep_value": 8, "failure": rows[-1]["failure"]}
    assert "out of memory" in rows[-1]["failure"]


def test_a_devices_sweep_keeps_the_descriptions_per_device_and_rates_efficiency_against_linear():
    seen: list = []
    rows = sweep.sweep("devices", [], [1, 2, 4], 3, 60.0, point=fake_point(devices_seen=seen))
    assert seen == [1, 2, 4]
    jax_rows = [r for r in rows if r["framework"] == "jax"]
    assert [r["descriptions"] for r in jax_rows] == [3, 6, 12]
    # images/s 10 * 1.5^k for 3, 6, 12 descriptions (bit lengths 2, 3, 4): 15, 22.5, 33.75 over 15 x devices
    assert [r["efficiency_vs_linear"] for r in jax_rows] == pytest.approx([1.0, 0.75, 0.5625])
    assert all("efficiency_vs_linear" not in r for r in rows if r["framework"] != "jax")


def test_an_unknown_sweep_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        sweep.sweep("threads", [], [1], 1, 1.0, point=fake_point())


def test_the_childs_environment_simulates_the_devices_and_replaces_an_earlier_count(monkeypatch):
    given = "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"
    monkeypatch.setenv("XLA_FLAGS", given)
    flags = sweep.child_environment(4)["XLA_FLAGS"].split()
    assert flags == ["--xla_cpu_enable_fast_math=false", "--xla_force_host_platform_device_count=4"]
    assert sweep.child_environment(None)["XLA_FLAGS"] == given


def test_failure_line_prefers_the_last_error():
    stderr = "I0000 compiling\nTraceback\nValueError: global batch 3 is not divisible\nI0000 exit\n"
    assert sweep.failure_line(stderr) == "ValueError: global batch 3 is not divisible"
    assert sweep.failure_line("") == "no output"


@pytest.mark.parametrize("kind", sweep.KINDS)
def test_the_plot_is_a_png_even_when_the_sweep_stopped(tmp_path, kind):
    rows = sweep.sweep(kind, [], [1, 2, 4], 1, 60.0, point=fake_point(failing_at=4 if kind == "descriptions" else None))
    path = tmp_path / "sweep.png"
    plots.plot_sweep(rows, kind, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.long
def test_a_real_devices_sweep_on_the_tiny_preset_writes_rows_and_a_plot(tmp_path):
    """Two processes (1 and 2 simulated devices) time the sharded eval step; the files hold the same rows."""
    command = [
        sys.executable, "-m", "contextblip_jax.benchmark", "--preset=tiny", "--measure=eval", "--stage=zeroshot",
        "--runs=2", "--descriptions=2", "--sweep=devices", "--sweep_max=2", f"--out={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    written = [json.loads(line) for line in (tmp_path / "sweep_devices.jsonl").read_text().splitlines()]
    assert printed == written
    assert [(r["sweep_value"], r["descriptions"]) for r in written] == [(1, 2), (2, 4)]
    assert written[0]["efficiency_vs_linear"] == 1.0 and written[1]["efficiency_vs_linear"] > 0
    assert (tmp_path / "sweep_devices.png").stat().st_size > 1000
