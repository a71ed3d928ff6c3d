"""The largest-batch search of `contextblip_jax.compile.fit` against memory models whose answer is known, the roofline
estimate's arithmetic, and one real cell compiled for a TPU slice."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contextblip_jax.compile import fit, hardware, targets
from tests.runs import config_file


def bytes_needed(batch: int, fixed: int, per_example: int, bend: float = 0.0) -> int:
    """The fake step's memory: `fixed + per_example·b (1 + bend·b/1000)` bytes, in whole bytes."""
    return int(fixed + per_example * batch * (1 + bend * batch / 1000))


def fake_probe(fixed: int, per_example: int, limit: int, bend: float = 0.0):
    """A `_probe` whose step needs `bytes_needed` of `limit` bytes per device."""
    calls = []

    def probe(config, batch, workdir, target):
        used = bytes_needed(batch, fixed, per_example, bend)
        calls.append(batch)
        report = {"memory_per_device_bytes": limit, "train": {}, "fits": used <= limit}
        return {"batch": batch, "fits": used <= limit, "bytes": used, "report": report}

    return probe, calls


@settings(max_examples=60, deadline=None)
@given(
    fixed=st.integers(1 << 20, 8 << 30),
    per_example=st.integers(1 << 16, 1 << 28),
    unit=st.sampled_from([1, 4, 8, 32]),
    start=st.integers(1, 2048),
    bend=st.one_of(st.just(0.0), st.floats(0.0, 0.2)),
)
def test_the_search_finds_the_largest_fitting_batch(fixed, per_example, unit, start, bend):
    """Memory linear in the batch (or convex, as attention's is): the search ends one unit apart with the true
    answer, in few compiles beyond the 4-fold steps up from a start far below it."""
    limit = 16 << 30
    probe, calls = fake_probe(fixed, per_example, limit, bend)
    config = config_file("synthetic", "stage=finetune,variant=tiny")
    config.grad_accum_steps = unit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit, "_probe", probe)
        found = fit.largest_batch(config, "unused", targets.parse("cpu"), start, max_compiles=40)

    def fits(b: int) -> bool:
        return bytes_needed(b, fixed, per_example, bend) <= limit

    expected = 0
    while fits(expected + unit):
        expected += unit
        if expected > 1 << 22:
            break
    if expected > 1 << 22:
        return
    assert found["largest_batch"] == expected, (found["probes"], expected)
    assert found["exact"] and found["smallest_failing_batch"] == expected + unit
    assert all(b % unit == 0 for b in calls) and len(set(calls)) == len(calls)
    climb = math.ceil(math.log(max(expected / start, 1), 4))  # upward steps grow the batch at most 4-fold
    # the start, the climb, then the bracket: along the line a straight profile needs two more probes; a curved
    # one falls back to halving the bracket at least every other probe
    bracket = 4 if bend == 0 else 2 * math.ceil(math.log2(4 * expected / unit + 1))
    assert len(calls) <= 1 + climb + bracket, found["probes"]


def test_a_search_out_of_compiles_says_it_is_not_exact(monkeypatch):
    probe, calls = fake_probe(1 << 30, 1 << 20, 16 << 30)
    monkeypatch.setattr(fit, "_probe", probe)
    config = config_file("synthetic", "stage=finetune,variant=tiny")
    found = fit.largest_batch(config, "unused", targets.parse("cpu"), 1, max_compiles=2)
    assert len(calls) == 2 and not found["exact"]
    assert found["largest_batch"] == max(calls)


def test_the_step_time_estimate_is_the_slower_of_compute_and_memory():
    report = {
        "device_count": 8,
        "device_kind": "TPU v5 lite",
        "dtype": "bfloat16",
        "train": {"flops_per_step": 8 * 197e12 * 0.5, "bytes_accessed_per_device_compiled": 819e9 * 0.25},
    }
    estimate = fit.step_time_estimate(report)
    assert estimate["compute_bound_s"] == pytest.approx(0.5)
    assert estimate["memory_bound_s"] == pytest.approx(0.25)
    assert estimate["estimate_s"] == pytest.approx(0.5)
    report["device_kind"] = "TPU v5"  # v5p: another chip with the same prefix
    assert fit.step_time_estimate(report)["peak_tflops_per_chip"] == 459.0


@pytest.mark.parametrize(
    ("kind", "dtype", "peak", "bandwidth"),
    [
        ("TPU v5 lite", "bfloat16", 197.0, 819.0),
        ("TPU v5", "bfloat16", 459.0, 2765.0),
        ("TPU v6 lite", "bfloat16", 918.0, 1640.0),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4, 3350.0),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0, 2039.0),
        ("cpu", "float32", None, None),
    ],
)
def test_data_sheet_figures_by_device_kind(kind, dtype, peak, bandwidth):
    assert hardware.spec_peak_for(kind, dtype) == peak
    assert hardware.spec_bandwidth_for(kind) == bandwidth


@pytest.mark.long
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_tiny_cell_compiles_for_v5e_8_and_writes_its_row(tmp_path):
    config = config_file("synthetic", "stage=finetune,variant=tiny")
    row = fit.cell(config, "finetune", "tiny", "v5e-8", str(tmp_path), max_compiles=2)
    assert row["batch"] == 40 and row["fits"] and row["batch_unit"] == 8
    assert row["largest_batch"] == 80 and not row["exact"]  # doubled once, then out of compiles
    assert 0 < row["peak_bytes_per_device"] < row["memory_per_device_bytes"]
    assert row["flops_per_image"] > 0 and row["compile_s"] > 0
    assert row["step_time"]["compute_bound_s"] > 0
    json.dumps(row)
    assert "| tiny | finetune | v5e-8 | unrolled | 40 |" in fit.markdown([row])


def test_a_sweep_taken_up_again_compiles_only_the_cells_it_lacks(tmp_path, monkeypatch):
    """A long table is filled over several runs: cells already in `--out` are read back, not compiled again,
    and a cell that differs only in a config key the sweep sets (here scan, then the mesh) is a cell of its own."""
    compiled = []

    def fake_cell(config, stage, variant, target_name, workdir, max_compiles, start_batch, protocol):
        compiled.append((variant, stage, target_name, bool(config.scan_layers), tuple(config.mesh)))
        label = targets.parse(target_name).label
        keys = {"dtype": config.dtype, "scan_layers": bool(config.scan_layers), "remat": list(config.remat)}
        keys.update(protocol=protocol, group_by_set=bool(config.data.group_by_set))
        keys["mesh_config"], keys["start_batch"] = list(config.mesh), start_batch
        return {"variant": variant, "stage": stage, "target": label, **keys, "compiled": len(compiled)}

    monkeypatch.setattr(fit, "cell", fake_cell)
    monkeypatch.setattr(fit, "markdown", lambda rows: "row")
    out = str(tmp_path / "fit.jsonl")
    plain = {"scan_layers": False, "remat": (), "dtype": "bfloat16"}
    first = fit.sweep(["tiny"], ["finetune"], ["v5e-8"], plain, out, str(tmp_path), 2)
    again = fit.sweep(["tiny"], ["finetune", "context"], ["v5litepod-8"], plain, out, str(tmp_path), 2)
    data = (-1, 1, 1)
    assert compiled == [("tiny", "finetune", "v5e-8", False, data), ("tiny", "context", "v5litepod-8", False, data)]
    assert again[0] == first[0]  # the same slice under gcloud's name: read back
    fit.sweep(["tiny"], ["finetune"], ["v5e-8"], {**plain, "scan_layers": True}, out, str(tmp_path), 2)
    assert compiled[-1] == ("tiny", "finetune", "v5e-8", True, data)
    fit.sweep(["tiny"], ["finetune"], ["v5e-8"], {**plain, "mesh": (-1, 4, 1)}, out, str(tmp_path), 2)
    assert compiled[-1] == ("tiny", "finetune", "v5e-8", False, (-1, 4, 1))
    fit.sweep(["tiny"], ["finetune"], ["v5e-8"], plain, out, str(tmp_path), 2, start_batch=80)
    fit.sweep(["tiny"], ["finetune"], ["v5e-8"], plain, out, str(tmp_path), 2, start_batch=80)
    assert len(compiled) == 5
    improved = fit.sweep(["tiny"], ["finetune"], ["v5e-8"], {**plain, "protocol": "improved"}, out, str(tmp_path), 2)
    assert len(compiled) == 6 and improved[0]["group_by_set"]  # the improved protocol's cell: grouped by set
    fit.sweep(["tiny"], ["finetune"], ["v5e-8"], {**plain, "protocol": "improved"}, out, str(tmp_path), 2)
    assert len(compiled) == 6
    with open(out) as f:
        assert len(f.readlines()) == 6


def test_rows_written_before_the_mesh_was_recorded_are_the_data_parallel_cells(tmp_path):
    out = tmp_path / "fit.jsonl"
    out.write_text(json.dumps({"variant": "B/16", "stage": "finetune", "target": "8xh100", "dtype": "bfloat16"}))
    config = {"dtype": "bfloat16", "scan_layers": False, "remat": (), "remat_policy": "full", "mesh": (-1, 1, 1)}
    assert fit.cell_key("B/16", "finetune", "8xh100", config) in fit.done_cells(str(out))
    assert fit.cell_key("B/16", "finetune", "8xh100", {**config, "mesh": (-1, 8, 1)}) not in fit.done_cells(str(out))


@pytest.mark.parametrize(
    ("exact", "high", "shown"), [(True, 432, "| 424 |"), (False, 1024, "| ≥ 424, < 1024 |"), (False, None, "| ≥ 424 |")]
)
def test_the_table_says_how_far_the_search_got(exact, high, shown):
    row = {"variant": "B/16", "stage": "finetune", "target": "8xh100", "batch": 40, "peak_bytes_per_device": 11 << 30,
           "memory_per_device_bytes": 79 << 30, "fits": True, "largest_batch": 424, "exact": exact,
           "smallest_failing_batch": high, "flops_per_image": 144e9, "compile_s": 67.0, "step_time": None}  # fmt: skip
    assert shown in fit.markdown([row]).splitlines()[-1]


def test_a_grouped_row_gives_its_batch_in_descriptions_with_its_protocol_and_set_slots():
    row = {"variant": "B/16", "stage": "finetune", "target": "v5e-8", "batch": 40, "peak_bytes_per_device": 8 << 30,
           "memory_per_device_bytes": 16 << 30, "fits": True, "largest_batch": 80, "exact": False,
           "smallest_failing_batch": None, "flops_per_image": 144e9, "compile_s": 67.0, "step_time": None,
           "protocol": "improved", "group_by_set": True, "images_per_step": 160}  # fmt: skip
    assert "| unrolled | 40 (improved, grouped, 16 sets) | 8.0 of 16 GiB |" in fit.markdown([row])


def test_a_pod_row_names_its_model_parallel_axes_and_the_state_each_chip_holds():
    row = {"variant": "L/16", "stage": "finetune", "target": "v5e-256", "mesh": {"data": 16, "fsdp": 16, "tensor": 1},
           "batch": 256, "peak_bytes_per_device": 3 << 30, "argument_bytes_per_device": 3 << 28,
           "memory_per_device_bytes": 16 << 30, "fits": True, "largest_batch": 256, "exact": False,
           "smallest_failing_batch": None, "flops_per_image": None, "compile_s": 300.0, "step_time": None,
           "scan_layers": True, "remat": ["vision", "text"], "remat_policy": "dots"}  # fmt: skip
    shown = (
        "| L/16 | finetune | v5e-256, fsdp 16 | scan, remat dots (vision + text) | 256 | 3.0 of 16 GiB | 0.75 GiB "
        "| ≥ 256 | n/a |"
    )
    assert shown in fit.markdown([row])


@pytest.mark.parametrize(
    ("compute", "memory", "shown"), [(0.0366, 0.1114, "| 111 ms |"), (0.0366, None, "| 37 ms (compute only) |")]
)
def test_the_step_time_is_the_slower_bound_and_says_when_it_has_only_one(compute, memory, shown):
    row = {"variant": "B/16", "stage": "finetune", "target": "v5e-8", "batch": 40, "peak_bytes_per_device": 8 << 30,
           "memory_per_device_bytes": 16 << 30, "fits": True, "largest_batch": 80, "exact": True,
           "smallest_failing_batch": 88, "flops_per_image": 144e9, "compile_s": 67.0,
           "step_time": {"compute_bound_s": compute, "memory_bound_s": memory,
                         "estimate_s": max(t for t in (compute, memory) if t is not None)}}  # fmt: skip
    assert fit.markdown([row]).splitlines()[-1].endswith(shown)
