"""`--compile_only`: the run's steps compiled for a TPU slice or an NVIDIA node this machine does not have, the
report they leave, the error of a config that does not fit, and the target names.

The TPU and GPU tests need the deviceless wheels (`pip install -e ".[accelerators]"`) and
skip, saying so, without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contextblip_jax import parallel
from contextblip_jax.compile import aot, targets
from contextblip_jax.models import axes
from tests.runs import ROOT, config_file

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the accelerators extra)"
)
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="jax-cuda12-plugin is not installed (the accelerators extra)",
)

TPU_TARGETS = ("v4-8", "v5e-4", "v5e-8", "v5e-16", "v5e-256", "v5p-8", "v5p-16", "v6e-4", "v6e-8")
TPU_DEVICES = {"v4-8": 4, "v5e-4": 4, "v5e-8": 8, "v5e-16": 16, "v5e-256": 256, "v5p-8": 4, "v5p-16": 8}


def tiny_config(batch: int = 8):
    """The main job's config at the tiny variant; no data is read for compiling."""
    config = config_file("synthetic", "stage=finetune,variant=tiny")
    config.update_from_flattened_dict({"data.batch_size": batch, "eval.batch_size": 8})
    return config


def check_report(report: dict, workdir, kind: str, devices: int) -> None:
    on_disk = json.loads((workdir / aot.REPORT_FILE).read_text())
    assert on_disk == report
    assert report["platform"] == kind and report["device_count"] == devices and report["fits"]
    assert report["mesh"] == {"data": devices, "fsdp": 1, "tensor": 1}
    for step in ("train", "eval"):
        section = report[step]
        assert 0 < section["argument_bytes"] <= section["peak_bytes"] < report["memory_per_device_bytes"]
        assert section["flops_per_step"] > 0
        assert section["flops_per_image"] == pytest.approx(section["flops_per_step"] / 80)
        assert section["compile_s"] > 0 and section["lowering_s"] > 0
    assert report["train"]["alias_bytes"] > 0  # the train step donates its state, as the trainer's does
    # gradients of a data-parallel step are summed over the devices; scoring needs no collective
    assert report["train"]["collectives"]["all-reduce"] >= 1
    assert sum(report["eval"]["collectives"].values()) == 0


@pytest.mark.long
@needs_libtpu
def test_tiny_config_compiles_for_v5e_8(tmp_path):
    report = aot.compile_only(tiny_config(), str(tmp_path), targets.parse("v5litepod-8"))
    check_report(report, tmp_path, "tpu", 8)
    assert report["device_kind"] == "TPU v5 lite" and report["memory_per_device_bytes"] == 16 << 30
    # a TPU's own cost analysis counts each device's share of the same program
    assert 0 < report["train"]["flops_per_device_compiled"] < report["train"]["flops_per_step"]
    assert "peak / device" in aot.table(report) and "fits" in aot.table(report)


@pytest.mark.long
@needs_libtpu
def test_scanned_towers_compile_for_v5e_8_and_count_the_unrolled_flops(tmp_path):
    """XLA counts a loop's body once: the report counts FLOPs on the same step unrolled, so scanning changes the
    program and its compile, not the FLOPs reported."""
    unrolled = aot.compile_only(tiny_config(), str(tmp_path / "unrolled"), targets.parse("v5e-8"))
    config = tiny_config()
    config.scan_layers = True
    scanned = aot.compile_only(config, str(tmp_path / "scanned"), targets.parse("v5e-8"))
    check_report(scanned, tmp_path / "scanned", "tpu", 8)
    assert scanned["scan_layers"] and not unrolled["scan_layers"] and "layers scanned" in aot.table(scanned)
    for step in ("train", "eval"):
        assert scanned[step]["flops_per_step"] == pytest.approx(unrolled[step]["flops_per_step"], rel=1e-6)
        assert scanned[step]["flops_per_device_compiled"] is None
        assert "unrolled" in scanned[step]["flops_source"]


@pytest.mark.long
@needs_cuda_plugin
def test_tiny_config_compiles_for_h100x8(tmp_path):
    report = aot.compile_only(tiny_config(), str(tmp_path), targets.parse("h100x8"))
    check_report(report, tmp_path, "gpu", 8)
    assert report["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert report["train"]["flops_per_device_compiled"] is None  # the GPU path reports none: the CPU count stands
    assert "n/a" in aot.table(report)


@pytest.mark.long
def test_tiny_config_compiles_for_this_cpu(tmp_path):
    report = aot.compile_only(tiny_config(), str(tmp_path), targets.parse("cpu"))
    assert report["platform"] == "cpu" and report["device_count"] == jax.device_count() and report["fits"]
    assert report["train"]["flops_per_step"] > 0


@pytest.mark.long
@needs_libtpu
def test_a_config_too_large_for_v5e_4_fails_naming_target_memory_and_remedies(tmp_path):
    """The tiny model with a 64M-token vocabulary (4.3G parameters, replicated with their Adam moments) cannot fit
    chips of 16 GiB; the command exits non-zero with the figures, and compile.json records the failure. (A huge
    batch is no test: XLA's TPU compiler rematerialises for minutes until it fits.)"""
    workdir = tmp_path / "w"
    command = [
        sys.executable, "-m", "contextblip_jax.train", "--config=configs/synthetic.py:stage=finetune,variant=tiny",
        f"--workdir={workdir}", "--compile_only=v5e-4", "--config.model.blip.text.vocab_size=67108864",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode != 0, result.stdout[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the finetune train step does not fit v5e-4"), message
    assert "each of its 4 TPU v5 lite devices has 16.00 GiB" in message
    assert re.search(r"needs at least \d+\.\d\d GiB per device \(XLA: RESOURCE_EXHAUSTED", message), message
    assert "--config.mesh='(1,4,1)'" in message
    for remedy in ("--config.data.batch_size", "--config.mesh", "--config.remat", "--config.grad_accum_steps"):
        assert remedy in message
    report = json.loads((workdir / aot.REPORT_FILE).read_text())
    assert report["fits"] is False and report["target"] == "v5e-4"


def test_exhausted_need_reads_xla_messages():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (31.80G) "
        "exceeds available HBM (15.75G)"
    )
    assert aot.exhausted_need(message) == (int(31.80 * (1 << 30)), int(15.75 * (1 << 30)))
    assert aot.exhausted_need("Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == (
        int(20.5 * (1 << 30)),
        int(15.75 * (1 << 30)),
    )
    assert aot.exhausted_need("RESOURCE_EXHAUSTED: something else") == (None, None)


# -- target names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical", "topology", "chip_config"),
    [
        ("v5litepod-8", "v5e-8", "v5e:2x4", "default"),
        ("v5e-8", "v5e-8", "v5e:2x4", "default"),
        ("V5LITEPOD-4", "v5e-4", "v5e:2x2", "default"),
        ("v5e-16", "v5e-16", "v5e:4x4", "default"),
        ("v5e-256", "v5e-256", "v5e:16x16", "default"),
        ("v4-8", "v4-8", "v4:2x2x1", "megacore"),
        ("v5p-8", "v5p-8", "v5:2x2x1", "megacore"),
        ("v5p-16", "v5p-16", "v5:2x2x2", "megacore"),
        ("v6e-4", "v6e-4", "v6e:2x2", "default"),
        ("v6e-8", "v6e-8", "v6e:2x4", "default"),
    ],
)
def test_tpu_names_map_to_libtpu_topologies(name, canonical, topology, chip_config):
    target = targets.parse(name)
    assert (target.name, target.kind, target.topology, target.chip_config) == (canonical, "tpu", topology, chip_config)


@pytest.mark.parametrize(
    ("name", "model", "hosts", "per_host"),
    [("h100x8", "h100", 1, 8), ("8xh100", "h100", 1, 8), ("2x8xh100", "h100", 2, 8), ("a100", "a100", 1, 8),
     ("h200x4", "h200", 1, 4), ("4xa100", "a100", 1, 4)],
)  # fmt: skip
def test_gpu_names_give_model_hosts_and_gpus_per_host(name, model, hosts, per_host):
    target = targets.parse(name)
    assert (target.kind, target.model, target.hosts, target.per_host) == ("gpu", model, hosts, per_host)
    assert target.memory_per_device == targets.GPU_MEMORY[model]


@pytest.mark.parametrize("name", ["v5e-6", "v4-4", "v7-8", "v5litepod", "h100x0", "b200x8", "tpu", "8x", "cpu-2", ""])
def test_bad_names_are_errors_listing_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"valid targets: cpu; TPU v4-N .* GPU .*h100") as error:
        targets.parse(name)
    assert repr(name) in str(error.value)


@given(
    family=st.sampled_from(sorted(targets.TPU_FAMILIES)),
    index=st.integers(0, 7),
    slices=st.integers(1, 4),
)
def test_every_listed_tpu_size_parses_and_round_trips(family, index, slices):
    cores = targets.TPU_FAMILIES[family][3]
    sizes = sorted(targets.TPU_CUBES if cores == 2 else targets.TPU_GRIDS)
    count = sizes[index % len(sizes)] * cores
    target = targets.parse(f"{family}-{count}", num_slices=slices)
    assert target.name == f"{family}-{count}" and target.num_slices == slices
    assert targets.parse(target.name) == targets.parse(target.name.upper())
    assert str(count) in targets.valid_names()


@given(st.text(alphabet="v4560ehpx-12ailtod8 ", max_size=11))
def test_a_parsed_name_is_canonical_and_anything_else_lists_the_grammar(text):
    """Strings near the grammar either parse to a target whose canonical name parses back to itself, or fail
    with the list of valid names."""
    try:
        target = targets.parse(text)
    except ValueError as error:
        assert "valid targets" in str(error)
        return
    assert targets.parse(target.name) == target


# -- every target compiles ---------------------------------------------------------------------------------------


def _sharded_mlp_step(mesh: jax.sharding.Mesh) -> dict[str, int]:
    """A small step with parameters and batch split over all devices (FSDP-like), compiled for the mesh's
    devices; the collectives in its HLO."""
    weight = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes.BATCH_AXES, None))
    batch = parallel.batch_sharding(mesh)

    def step(w, x):
        grad = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
        return w - 0.1 * grad

    n = mesh.devices.size
    jitted = jax.jit(step, in_shardings=(weight, batch), out_shardings=weight, donate_argnums=0)
    args = (jax.ShapeDtypeStruct((8 * n, 256), jnp.float32), jax.ShapeDtypeStruct((4 * n, 8 * n), jnp.float32))
    counts = aot.count_collectives(jitted.trace(*args).lower().compile().as_text())
    assert counts["all-gather"] + counts["reduce-scatter"] + counts["all-reduce"] > 0, counts
    return counts


@needs_libtpu
@pytest.mark.parametrize("name", TPU_TARGETS)
def test_every_tpu_target_compiles_a_sharded_step(name):
    target = targets.parse(name)
    devices = list(targets.devices(target))
    expected = TPU_DEVICES.get(name, int(name.split("-")[1]))
    assert len(devices) == expected and {d.platform for d in devices} == {"tpu"}
    _sharded_mlp_step(parallel.make_mesh((1, -1, 1), devices=devices))


@needs_libtpu
def test_multislice_devices_carry_their_slice():
    devices = targets.devices(targets.parse("v5e-8", num_slices=2))
    assert len(devices) == 16 and sorted({d.slice_index for d in devices}) == [0, 1]
    config = tiny_config()
    mesh = aot.target_mesh(config, list(devices))
    assert mesh.devices.shape == (16, 1, 1)
    assert [d.slice_index for d in mesh.devices[:8, 0, 0]] == [0] * 8
    _sharded_mlp_step(mesh)


@needs_cuda_plugin
@pytest.mark.parametrize("name", ["a100x8", "h200x8", "2x8xh100"])
def test_gpu_targets_compile_a_sharded_step(name):
    target = targets.parse(name)
    devices = list(targets.devices(target))
    assert len(devices) == target.hosts * target.per_host
    assert len({d.process_index for d in devices}) == target.hosts
    _sharded_mlp_step(parallel.make_mesh((1, -1, 1), devices=devices))


# -- the base model ----------------------------------------------------------------------------------------------


@needs_libtpu
@pytest.mark.slow
def test_base_finetune_step_fits_v5e_8(tmp_path):
    """ViT-B/16 at 224 px, bfloat16, 40 descriptions (400 images, 30-token texts) over 8 chips: about 8.3 GiB of 16
    per chip, ~144 GFLOP per image. Takes minutes on a 2-core machine (blocks are unrolled; docs/compile-and-fit.md,
    "Layer scan and compile time")."""
    config = config_file("imagecode", "stage=finetune")
    config.update_from_flattened_dict({"data.batch_size": 40, "eval.batch_size": 40})
    start = time.perf_counter()
    report = aot.compile_only(config, str(tmp_path), targets.parse("v5e-8"))
    print(aot.table(report), f"\n{time.perf_counter() - start:.0f} s")
    assert report["fits"] and report["train"]["peak_bytes"] < 16 << 30
    assert report["train"]["flops_per_image"] == pytest.approx(144e9, rel=0.05)
    assert np.isclose(report["train"]["images_per_step"], 400)
    assert os.path.exists(tmp_path / aot.REPORT_FILE)


def test_grouped_batches_are_laid_out_as_the_run_lays_them_out():
    """Batch sizes stay in descriptions: 16 over 2 data shards and 2 micro-batches are 4 groups of 4 description
    slots and 2 set slots each; evaluation's 8 over 2 shards, 2 groups of 4 and 2."""
    from contextblip_jax import stages

    config = tiny_config(batch=16)
    config.update_from_flattened_dict({"data.group_by_set": True, "grad_accum_steps": 2})
    stage = stages.get("finetune")
    train = aot.batch_shapes(config, stage, train=True, shards=2)
    assert train["images"].shape == (8, 10, 32, 32, 3) and train["set_index"].shape == (4, 4)
    assert train["input_ids"].shape[0] == 16
    assert aot.images_per_step(config, stage, True, 2) == 80
    evaluation = aot.batch_shapes(config, stage, train=False, shards=2)
    assert evaluation["images"].shape == (4, 10, 32, 32, 3) and evaluation["set_index"].shape == (2, 4)
    config.update_from_flattened_dict({"data.group_by_set": False, "eval.group_by_set": False})
    assert "set_index" not in aot.batch_shapes(config, stage, train=True, shards=2)
    assert aot.images_per_step(config, stage, False, 2) == 80


def test_stage_2b_on_cached_features_compiles_on_the_vectors():
    from contextblip_jax import stages

    config = config_file("synthetic", "stage=context,variant=tiny")
    config.context.cache_features = True
    shapes = aot.batch_shapes(config, stages.get("context"), train=True)
    assert set(shapes) == {"features", "target", "is_video"}
    assert shapes["features"].shape == (config.data.batch_size, 10, config.model.blip.text.width)
    assert aot.images_per_step(config, stages.get("context"), True, 1) == 0


@pytest.mark.long
def test_grouped_and_cached_configs_compile_for_this_cpu(tmp_path):
    config = tiny_config(batch=16)
    config.update_from_flattened_dict({"data.group_by_set": True, "grad_accum_steps": 2})
    report = aot.compile_only(config, str(tmp_path / "grouped"), targets.parse("cpu"))
    assert report["train"]["images_per_step"] == 80 and report["train"]["descriptions_per_step"] == 16
    assert report["eval"]["images_per_step"] == 40  # 8 descriptions in 4 set slots
    per_description = aot.compile_only(tiny_config(batch=16), str(tmp_path / "plain"), targets.parse("cpu"))
    assert report["train"]["flops_per_description"] < per_description["train"]["flops_per_description"]
    cached = config_file("synthetic", "stage=context,variant=tiny")
    cached.context.cache_features = True
    report = aot.compile_only(cached, str(tmp_path / "cached"), targets.parse("cpu"))
    assert report["train"]["images_per_step"] == 0 and report["train"]["flops_per_step"] > 0
