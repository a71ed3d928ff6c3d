"""The trainer's parameters are never whole on one device or host: on 8 simulated CPU devices with mesh
(1, 8, 1) (fsdp = 8), for random initialisation, a previous run's latest and best checkpoints and a converted
folder, `train.initial_state` builds every parameter, and its optimizer moments, straight into their shards;
and the jitted draw of `parallel.init_sharded` needs no more temporaries per device with the `fan_in` init than
with `bert` (see `parallel.init_sharded`).

The 8-device process (`python -m tests.test_sharded_init WORKDIR`, as tests/test_parallel.py runs its own)
prints what it saw as JSON: for each source, the shard shapes of every array of the model `weights.initial_model`
handed the trainer and of the train state, and the shape of every host array put on a device while building
(Orbax reads a checkpoint's arrays to the host, then puts them on devices: a whole parameter read to be split
would show here). The unsharded path failed both, measured once by hand on the tiny model: its model held all
205 parameters whole on device 0, and its restores put 27 sharded parameters' whole shapes from the host, the
largest the word embedding's 976,768 floats; here the largest is that embedding's shard, 122,096 floats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from contextblip_jax import parallel, runconfig, stages, storage, train
from contextblip_jax.checkpoints import best, run_state, weights
from contextblip_jax.convert import directory, load_contextblip
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import dotted_path
from tests.runs import facts_on_devices, run_config

MESH = (1, 8, 1)
SOURCES = ("random", "latest", "best", "converted")
INITS = ("bert", "fan_in")
"""The inits whose jitted draws' temporaries are compared (`torch` redraws too few of the tiny model's parameters
for a flat draw to show: 1.568 MB per device with one, 1.567 MB without; each compile adds ~15 s on 2 cores)."""


def expected_shard(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> list[int]:
    """The shard mesh (1, 8, 1) gives an array under the default rules, worked out apart from `parallel`: its
    first `embed` dimension split 8 ways when 8 divides it (mlp, heads and vocab go to `tensor`, of size 1)."""
    shard = list(shape)
    if "embed" in axes:
        dim = axes.index("embed")
        if shape[dim] % 8 == 0:
            shard[dim] //= 8
    return shard


# -- the 8-device script -----------------------------------------------------------------------------------------


def _shards(arrays: dict[str, jax.Array]) -> dict[str, list]:
    """Each array's global shape, and the distinct shapes of the shards its 8 devices hold."""
    return {
        name: [list(value.shape), sorted({tuple(s.data.shape) for s in value.addressable_shards}), len(value.devices())]
        for name, value in arrays.items()
    }


def _record_host_puts(shapes: list[list[int]]) -> None:
    """Every host (numpy) array given to `jax.device_put` from now on adds its shape to `shapes`."""
    put = jax.device_put

    def recorded(x, *args, **kwargs):
        for leaf in jax.tree.leaves(x):
            if isinstance(leaf, np.ndarray):
                shapes.append(list(leaf.shape))
        return put(x, *args, **kwargs)

    jax.device_put = recorded


def _draw_temporaries(mesh: jax.sharding.Mesh) -> dict[str, int]:
    """Per init, the bytes of temporaries per device that XLA gives `parallel.init_sharded`'s jitted draw of the
    tiny model (compiled memory analysis), caught at its `jax.jit` with `out_shardings`."""
    config = run_config("unused")
    sizes: list[int] = []
    jit = jax.jit

    def measured(fn, **options):
        jitted = jit(fn, **options)
        if "out_shardings" not in options:
            return jitted

        def call():
            compiled = jitted.lower().compile()
            sizes.append(compiled.memory_analysis().temp_size_in_bytes)
            return compiled()

        return call

    def temporaries(init: str) -> int:
        model_config = dataclasses.replace(runconfig.model_config(config), init=init)
        del sizes[:]
        parallel.init_sharded(lambda: ContextBLIP(model_config, rngs=nnx.Rngs(config.seed)), mesh)
        (size,) = sizes  # one jitted draw
        return size

    jax.jit = measured
    try:
        return {init: temporaries(init) for init in INITS}
    finally:
        jax.jit = jit


def _facts(workdir: str) -> dict:
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh(MESH)
    host_puts: list[list[int]] = []
    _record_host_puts(host_puts)
    models: list[tuple[ContextBLIP, dict]] = []
    initial_model = weights.initial_model

    def captured(*args) -> tuple[ContextBLIP, str]:
        """The model `weights.initial_model` hands the trainer, and its shards (before the trainer donates them)."""
        model, origin = initial_model(*args)
        params = nnx.to_flat_state(nnx.state(model, nnx.Param))
        models.append((model, _shards({dotted_path(path): var.get_value() for path, var in params})))
        return model, origin

    weights.initial_model = captured

    def build(source: str, **overrides) -> tuple[dict, train.TrainState]:
        config = run_config(os.path.join(workdir, "data"), mesh=MESH, **overrides)
        del host_puts[:], models[:]
        config = runconfig.prepare(config)
        _, state = train.initial_state(config, stages.get(config.stage), mesh, os.path.join(workdir, source), 1)
        moments = {
            jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if getattr(path[-2], "name", None) in ("mu", "nu")  # Adam's moments: ...mu['blip.x.kernel']
        }
        return {
            "model": models[0][1],
            "state": _shards({**state.trainable, **state.frozen}),
            "moments": _shards(moments),
            "trainable": sorted(state.trainable),
            "host_puts": list(host_puts),
        }, state

    facts, state = {}, None
    facts["random"], state = build("random")
    saved = {**state.trainable, **state.frozen}
    previous = os.path.join(workdir, "random")
    runs = run_state.RunCheckpoints(previous)
    runs.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
    runs.close()
    keeper = best.BestKeeper(previous, best.Criterion())
    keeper.offer({"step": 1, "split": "valid", "acc": 0.5}, lambda: saved)
    keeper.close()
    converted = os.path.join(workdir, "converted-weights")
    directory.write_converted(
        converted, config_json=models[0][0].config.to_json(), params={k: np.asarray(v) for k, v in saved.items()},
        metadata={"dtype": "bfloat16", "model": "contextblip"}, tokenizer_dir=None,
    )  # fmt: skip
    expected = {name: np.asarray(value) for name, value in saved.items()}
    for source, overrides in {
        "latest": {"init": previous, "init_checkpoint": "latest"},
        "best": {"init": previous},
        "converted": {"init": converted},
    }.items():
        facts[source], state = build(source, **overrides)
        restored = {**state.trainable, **state.frozen}
        rounded = source == "converted"  # stored as bfloat16
        facts[source]["equal"] = all(
            np.array_equal(np.asarray(restored[k]), v.astype(jax.numpy.bfloat16).astype(np.float32) if rounded else v)
            for k, v in expected.items()
        )
    facts["temporaries"] = _draw_temporaries(mesh)
    return facts


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    workdir = str(tmp_path_factory.mktemp("sharded"))
    return {"workdir": workdir, **facts_on_devices("tests.test_sharded_init", 8, workdir, timeout=900)}


@pytest.fixture(scope="module")
def axes() -> dict[str, tuple]:
    """Every parameter's logical axes, by dotted name."""
    model = nnx.eval_shape(lambda: ContextBLIP(runconfig.model_config(run_config("unused")), rngs=nnx.Rngs(0)))
    return {
        dotted_path(path): tuple(var.get_metadata().get("out_sharding") or ())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# -- 8 simulated devices -------------------------------------------------------------------------------------------


@pytest.mark.long
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("part", ["model", "state"])
def test_every_parameter_is_born_in_its_shards(facts, axes, source, part):
    """Every device holds the shard the rules give it and no more, from the model the trainer is handed on."""
    seen = facts[source][part]
    assert set(seen) == set(axes)
    sharded_bytes = 0
    for name, (shape, shards, devices) in seen.items():
        assert devices == 8 and shards == [expected_shard(tuple(shape), axes[name])], (name, shape, shards)
        if shards[0] != shape:
            sharded_bytes += math.prod(shape)
    assert sharded_bytes > 0.9 * sum(math.prod(shape) for shape, _, _ in seen.values())  # not a vacuous check


@pytest.mark.long
@pytest.mark.parametrize("source", SOURCES)
def test_optimizer_moments_follow_their_parameters(facts, source):
    state = facts[source]["state"]
    moments = facts[source]["moments"]
    assert len(moments) == 2 * len(facts[source]["trainable"])  # Adam's mu and nu of every trainable parameter
    for path, (shape, shards, _) in moments.items():
        name = next(name for name in state if f"'{name}'" in path)
        assert [shape, shards] == state[name][:2], path


@pytest.mark.long
@pytest.mark.parametrize("source", SOURCES)
def test_no_host_array_holds_a_whole_sharded_parameter(facts, source):
    """Restores read each device's slice to the host, not the parameter; random draws never touch the host."""
    state = facts[source]["state"]
    whole = {tuple(shape) for shape, shards, _ in state.values() if shards[0] != shape}
    replicated = {tuple(shape) for shape, shards, _ in state.values() if shards[0] == shape}
    puts = {tuple(shape) for shape in facts[source]["host_puts"]}
    assert not (puts & (whole - replicated)), sorted(puts & whole)
    if source != "random":  # the check sees Orbax's reads: each sharded parameter arrives as its shards
        assert {tuple(shards[0]) for shape, shards, _ in state.values() if shards[0] != shape} <= puts


@pytest.mark.long
@pytest.mark.parametrize("source", ["latest", "best", "converted"])
def test_restored_values_are_the_saved_ones(facts, source):
    assert facts[source]["equal"]  # the converted folder's exactly as bfloat16 rounded them


@pytest.mark.long
def test_fan_in_init_needs_no_more_temporaries_than_bert(facts):
    """`layers.redraw_fan_in` draws each kernel in its own shape, in its shards, as `bert`'s initialisers do.
    Measured on the tiny model, per device: fan_in 1.53 MB, bert 1.58 MB; one flat draw sliced over all the
    kernels, as `_redraw` drew before, gave fan_in 2.19 MB, 1.39 times bert's (for B/16, 2.9 GB to bert's 0.20 GB:
    see `parallel.init_sharded`)."""
    temporaries = facts["temporaries"]
    assert set(temporaries) == set(INITS) and temporaries["bert"] > 0, temporaries
    assert temporaries["fan_in"] <= 1.1 * temporaries["bert"], temporaries


@pytest.mark.long
def test_random_initialisation_is_the_eager_one_within_an_ulp(facts):
    """Drawn under jit on 8 devices, the parameters are an eager build's up to float rounding (not bit for bit:
    XLA compiles the draws' scaling as one program, see `parallel.init_sharded`)."""
    _, drawn, _ = weights.run_params(os.path.join(facts["workdir"], "random"), "latest")
    config = run_config("unused")
    eager = nnx.state(ContextBLIP(runconfig.model_config(config), rngs=nnx.Rngs(config.seed)), nnx.Param)
    for path, variable in nnx.to_flat_state(eager):
        np.testing.assert_array_max_ulp(drawn[dotted_path(path)], np.asarray(variable.get_value()), maxulp=1)


# -- one device, in-process ------------------------------------------------------------------------------------------


@pytest.mark.long
def test_a_blip_folder_builds_in_its_shards_as_load_contextblip_builds_it(tmp_path):
    """A converted BLIP folder at another resolution: the BLIP parameters as `load_contextblip` reads them (the
    position embeddings resampled on the host), the parts BLIP lacks drawn as it draws them, within an ulp."""
    config = run_config("unused", model__blip__vision__image_size=48, init=str(tmp_path / "blip"))
    model = ContextBLIP(runconfig.model_config(run_config("unused")), rngs=nnx.Rngs(5))
    flat = {dotted_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    given = {name.removeprefix("blip."): value for name, value in flat.items() if name.startswith("blip.")}
    directory.write_converted(
        config.init, config_json=model.config.blip.to_json(), params=given,
        metadata={"dtype": "float32", "model": "blip"}, tokenizer_dir=None,
    )  # fmt: skip
    sharded, _ = weights.initial_model(config)
    host = load_contextblip(config.init, image_size=48, seed=config.seed, init=config.model.init)
    assert sharded.config == host.config and sharded.blip.vision.pos_embed.shape == (1, 37, 32)
    expected = {dotted_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(host, nnx.Param))}
    for path, variable in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        name, value = dotted_path(path), np.asarray(variable.get_value())
        if name.startswith("blip."):
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
        else:
            np.testing.assert_array_max_ulp(value, np.asarray(expected[name]), maxulp=1)


@pytest.mark.parametrize("damage", ["truncated arrays", "garbled config"])
def test_a_damaged_converted_folder_given_to_init_is_refused_naming_it(tmp_path, damage):
    config = run_config("unused", init=str(tmp_path / "converted"))
    model = nnx.eval_shape(lambda: ContextBLIP(runconfig.model_config(config), rngs=nnx.Rngs(0)))
    params = {dotted_path(p): np.zeros(v.shape, np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    directory.write_converted(
        config.init, config_json=model.config.to_json(), params=params,
        metadata={"dtype": "float32", "model": "contextblip"}, tokenizer_dir=None,
    )  # fmt: skip
    if damage == "truncated arrays":
        for path in (tmp_path / "converted" / directory.PARAMS_DIR).glob("**/d/*"):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        (tmp_path / "converted" / directory.CONFIG_FILE).write_text('{"vision": ')
    with pytest.raises(storage.DamagedCheckpointError, match=f"{config.init}.*convert them again"):
        weights.initial_model(config)


if __name__ == "__main__":
    print(json.dumps(_facts(sys.argv[1])))
