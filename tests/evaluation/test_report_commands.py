"""The report and `--explain` as a user runs them: `evaluate --report` on a trained run and on a zero-shot run,
the page opened in headless Chromium, and `predict --explain` (long pass: they start processes and a browser)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests import report_browser
from tests.runs import ROOT, SETS, train_command

pytestmark = pytest.mark.long


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> str:
    workdir = str(tmp_path_factory.mktemp("report_run"))
    done = run(train_command(workdir, data_root, "--config.total_steps=4"))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def evaluate(workdir: str, data_root: str, report: str, stage: str = "finetune", *flags: str) -> dict:
    done = run(
        [sys.executable, "-m", "contextblip_jax.evaluate", f"--config=configs/synthetic.py:stage={stage},variant=tiny",
         f"--workdir={workdir}", f"--config.data.root={data_root}", f"--config.data.synthetic={SETS}",
         "--config.eval.batch_size=8", f"--report={report}", *flags],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_trained_run_reports_and_the_page_loads_in_a_browser(tmp_path, trained, data_root):
    report = str(tmp_path / "report")
    printed = evaluate(trained, data_root, report, "finetune", "--report_hardest=3", "--report_correct=2")
    with open(os.path.join(report, "report.json")) as f:
        summary = json.load(f)
    assert printed["report"] == report and printed["pointing"] == summary["pointing"]
    assert summary["pointing"]["descriptions"] + summary["pointing"]["no_shape"] == summary["descriptions"]
    assert 1 <= summary["cards"] <= 5
    why = report_browser.available()
    if why:
        pytest.skip(why)
    seen = report_browser.inspect(report, screenshot=str(tmp_path / "report.png"))
    assert seen["console_errors"] == [] and seen["broken_images"] == []
    assert seen["cards"] == summary["cards"] and seen["candidates"] == 10 * summary["cards"]
    assert seen["images"] == 10 * summary["cards"] + 3  # and the three plots
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[0] >= 1000
    os.remove(os.path.join(report, "cards", "0", "4.png"))  # the check fails when an image is missing
    broken = report_browser.inspect(report)
    assert broken["broken_images"] == ["cards/0/4.png"] and len(broken["console_errors"]) == 1


def test_a_zero_shot_run_reports_from_its_starting_weights(tmp_path, trained, data_root):
    summary = evaluate(str(tmp_path / "zeroshot"), data_root, str(tmp_path / "report"), "zeroshot",
                       f"--config.init={trained}", "--heatmap_layer=-1")  # fmt: skip
    assert summary["step"] == 0 and os.path.exists(tmp_path / "report" / "index.html")
    assert summary["pointing"]["descriptions"] > 0


def test_predict_explain_draws_the_ranked_grid(tmp_path, trained, data_root):
    folder = os.path.join(data_root, "image-sets", sorted(os.listdir(os.path.join(data_root, "image-sets")))[0])
    out = str(tmp_path / "explain.png")
    command = [sys.executable, "-m", "contextblip_jax.predict", f"--workdir={trained}", f"--images={folder}",
               "--text=two blue circles on the left", "--stage=finetune", f"--explain={out}"]  # fmt: skip
    done = run(command)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(out) as image:
        assert image.size[0] > 800 and image.size[1] > 400
    twice = run([*command, "--text=a red square"])
    assert twice.returncode == 1 and "exactly one --text" in twice.stderr  # absl's usage error
