"""What a run reports: metrics.jsonl rows, their truncation on resume, TensorBoard events and the curve."""

from __future__ import annotations

import json
import os

import pytest

from contextblip_jax.training.telemetry import METRICS_FILE, PLOT_FILE, PROGRESS_LINES, Telemetry, read_metrics


def test_rows_truncation_events_and_plot(tmp_path):
    workdir = str(tmp_path)
    telemetry = Telemetry(workdir, total_steps=30)
    for step in (10, 20, 30):
        telemetry.write({"step": step, "split": "train", "loss": 1.0 / step, "lr": 0.1})
    telemetry.write({"step": 20, "split": "valid", "acc": 0.5, "acc_video": 0.4, "acc_static": 0.6})
    telemetry.progress(30, 0.03, 12.5)
    telemetry.close()
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 20]
    assert all({"step", "split"} <= set(json.loads(line)) for line in lines)

    resumed = Telemetry(workdir, total_steps=30)
    resumed.truncate_after(20)  # a run resumed from step 20 logs 30 again
    assert [(r["step"], r["split"]) for r in read_metrics(workdir)] == [(10, "train"), (20, "train"), (20, "valid")]
    path = resumed.plot()
    resumed.close()
    assert path == os.path.join(workdir, PLOT_FILE) and os.path.getsize(path) > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))


def test_missing_file_reads_as_no_rows(tmp_path):
    assert read_metrics(str(tmp_path)) == []


def test_a_row_torn_by_a_kill_is_dropped_and_the_resumed_run_rewrites_the_file_whole(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n{"step": 3, "spl')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    Telemetry(str(tmp_path), total_steps=5).truncate_after(2)
    assert path.read_text() == '{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n'
    assert sorted(os.listdir(tmp_path)) == [METRICS_FILE, "tensorboard"]  # no temporary file left behind


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    rows = ['{"step": 1, "split": "train"}', '{"step": 2, "spl', '{"step": 3, "split": "train"}']
    (tmp_path / METRICS_FILE).write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON row"):
        read_metrics(str(tmp_path))


def test_a_log_file_gets_a_few_progress_lines_not_one_per_row(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    caplog.set_level("INFO")
    telemetry = Telemetry(str(tmp_path), total_steps=600)
    for step in range(10, 601, 10):
        telemetry.progress(step, 1.0, 10.0)
    telemetry.close()
    lines = [r.getMessage() for r in caplog.records if "step " in r.getMessage() and "ETA" in r.getMessage()]
    assert len(lines) <= PROGRESS_LINES + 1 and "step 600/600" in lines[-1]
