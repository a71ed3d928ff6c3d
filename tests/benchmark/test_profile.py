"""`--profile` says where the JAX step's time went, by kind of XLA operation, without counting the runtime twice."""

from __future__ import annotations

import gzip
import json

import pytest

from contextblip_jax.benchmark import profile
from tests.benchmark.test_main import benchmark


def test_op_kinds_sum_numbered_operations_and_leave_the_runtime_out(tmp_path):
    events = [
        {"ph": "X", "name": "ynn_fusion.420", "dur": 3000},
        {"ph": "X", "name": "ynn_fusion.7", "dur": 1500},
        {"ph": "X", "name": "dot", "dur": 250},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},
        {"ph": "X", "name": "end: ynn_fusion", "dur": 10},
        {"ph": "i", "name": "copy.3", "dur": 700},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert dict(profile.op_kinds(str(path))) == {"ynn_fusion": 4.5, "dot": 0.25}


def test_enable_op_events_adds_the_flag_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    profile.enable_op_events()
    profile.enable_op_events()
    assert profile.TRACEME_FLAG in profile.os.environ["XLA_FLAGS"]
    assert profile.os.environ["XLA_FLAGS"].count(profile.TRACEME_FLAG) == 1


@pytest.mark.long
def test_the_profile_row_names_the_steps_operations(tmp_path):
    _, row = benchmark("--measure=train", "--stage=finetune", "--descriptions=2", f"--profile={tmp_path}")
    assert (row["framework"], row["measure"]) == ("jax", "profile")
    assert row["trace"].startswith(str(tmp_path)) and row["ops_ms"] > 0
    assert sum(op["share"] for op in row["top_ops"]) <= 1.0 + 1e-3
    assert any("fusion" in op["op"] or op["op"].startswith("dot") for op in row["top_ops"])
