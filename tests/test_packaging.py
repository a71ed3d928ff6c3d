"""The package installs: `pip wheel .` builds a wheel holding `contextblip_jax` and nothing else of the checkout
(no tests, configs or launchers), and installed away from the checkout it imports and its console scripts run."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.runs import ROOT

SCRIPTS = {"train": "--compile_only", "evaluate": "--split", "predict": "--text", "convert": "--input",
           "fit": "--targets", "benchmark": "--measure"}  # fmt: skip
"""Each console script and a flag of its own that its `--help` must list."""


@pytest.mark.long
def test_the_wheel_holds_the_package_and_installs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = wheels.glob("contextblip_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "contextblip_jax/train.py" in names and "contextblip_jax/runconfig/checks.py" in names
    assert tops - {"contextblip_jax"} == {wheel.name.split("-py3")[0] + ".dist-info"}, sorted(tops)

    prefix = tmp_path / "prefix"
    subprocess.run([*pip, "install", "--no-deps", "--prefix", str(prefix), str(wheel)], check=True, timeout=600)
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": site, "JAX_PLATFORMS": "cpu"}
    where = subprocess.run(
        [sys.executable, "-c", "import contextblip_jax.train as t; print(t.__file__)"],
        cwd=away, env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert where.stdout.strip().startswith(site)
    for name, flag in SCRIPTS.items():
        script = prefix / "bin" / f"contextblip-{name}"
        shown = subprocess.run(
            [str(script), "--help"], cwd=away, env=env, capture_output=True, text=True, timeout=300, check=False
        )  # absl ends --help with exit status 1, as `python -m contextblip_jax.X --help` does
        assert "USAGE" in shown.stdout and f"  {flag}" in shown.stdout, (name, shown.stdout[-2000:])
        assert "Traceback" not in shown.stderr, (name, shown.stderr[-2000:])
