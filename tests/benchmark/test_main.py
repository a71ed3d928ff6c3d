"""`python -m contextblip_jax.benchmark` times the trainer's own step and reports what a reader needs to judge it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from contextblip_jax.benchmark.__main__ import peak_memory_fields
from tests.runs import ROOT

FIELDS = (
    "framework", "measure", "stage", "preset", "dtype", "descriptions", "images_per_s", "descriptions_per_s",
    "step_s", "compile_s", "flops_per_step", "tflops_per_s", "mfu", "peak_memory_bytes", "device", "threads",
)  # fmt: skip


def benchmark(*flags: str) -> list[dict]:
    command = [sys.executable, "-m", "contextblip_jax.benchmark", "--preset=tiny", "--runs=2", *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def check_row(row: dict, measure: str, stage: str, images: int, framework: str = "jax") -> None:
    assert set(FIELDS) <= set(row)
    assert (row["framework"], row["measure"], row["stage"], row["descriptions"]) == (framework, measure, stage, 3)
    step = row["step_s"]
    assert 0 < step["min"] <= step["median"] <= step["max"]
    assert row["images_per_s"] == pytest.approx(images / step["median"], rel=1e-3)
    assert row["flops_per_step"] > 1e6 and row["tflops_per_s"] == pytest.approx(
        row["flops_per_step"] / step["median"] / 1e12, abs=1e-3
    )
    assert 0 < row["mfu"] < 1 and row["peak_memory_bytes"] > 0


@pytest.mark.long
def test_train_row_holds_consistent_figures_and_counts_the_steps_own_flops():
    """Three descriptions cost about three times one (the optimizer update, the same for both, is small)."""
    (three,) = benchmark("--measure=train", "--stage=finetune", "--descriptions=3")
    check_row(three, "train", "finetune", images=30)
    (one,) = benchmark("--measure=train", "--stage=finetune", "--descriptions=1")
    assert 2.5 < three["flops_per_step"] / one["flops_per_step"] < 3.1


@pytest.mark.long
def test_eval_row_holds_consistent_figures():
    (row,) = benchmark("--measure=eval", "--stage=zeroshot", "--descriptions=3")
    check_row(row, "eval", "zeroshot", images=30)


@pytest.mark.long
def test_compare_gives_a_torch_row_with_the_same_work():
    jax_row, torch_row = benchmark("--measure=eval", "--stage=zeroshot", "--descriptions=3", "--compare=torch")
    check_row(torch_row, "eval", "zeroshot", images=30, framework="torch")
    assert torch_row["difference_vs_jax"] <= 1e-4
    assert torch_row["flops_per_step"] == jax_row["flops_per_step"]
    assert jax_row["peak_source"] == torch_row["peak_source"] and "PyTorch's" in jax_row["peak_source"]
    assert jax_row["ratio_vs_torch"] == pytest.approx(jax_row["images_per_s"] / torch_row["images_per_s"], rel=1e-2)
    assert torch_row["peak_memory_bytes"] == jax_row["peak_memory_bytes"]  # a CPU: one process's peak RSS
    assert torch_row["peak_memory_source"] == "host peak RSS (all frameworks of the run)"
    assert "xla_flags" in jax_row


def test_a_torch_row_on_a_gpu_reports_torchs_own_allocator():
    """JAX's `memory_stats` does not see PyTorch's CUDA allocations, so a GPU's torch row must not quote JAX's."""
    jax_memory, torch_memory = (31_989_542_912, "device peak_bytes_in_use"), (7_000_000_000, "torch.cuda")
    assert peak_memory_fields("torch", jax_memory, torch_memory)["peak_memory_bytes"] == 7_000_000_000
    assert peak_memory_fields("torch_compile", jax_memory, torch_memory)["peak_memory_source"] == "torch.cuda"
    assert peak_memory_fields("jax", jax_memory, torch_memory)["peak_memory_bytes"] == 31_989_542_912
    assert peak_memory_fields("torch", jax_memory, None)["peak_memory_bytes"] == 31_989_542_912


def test_a_stage_that_does_not_train_is_refused():
    command = [sys.executable, "-m", "contextblip_jax.benchmark", "--preset=tiny", "--measure=train"]
    command.append("--stage=zeroshot")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0 and "does not train" in result.stderr


@pytest.mark.long
def test_the_input_pipeline_row_measures_the_steps_batch_shape():
    step_row, input_row = benchmark("--measure=eval", "--stage=zeroshot", "--descriptions=3", "--input_pipeline")
    assert (input_row["framework"], input_row["measure"], input_row["workers"]) == ("input_pipeline", "input", 0)
    assert input_row["descriptions"] == step_row["descriptions"] == 3
    assert input_row["images_per_s"] == pytest.approx(10 * input_row["descriptions_per_s"], rel=1e-2)
    assert input_row["images_per_s"] > 0 and input_row["batch_ms"] > 0
