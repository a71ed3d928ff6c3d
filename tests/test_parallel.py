"""Mesh and sharding: mesh shapes, logical-axis rules, real parameter placement and sharded = unsharded numbers.

The pytest process already holds a 1-device CPU backend, so the 8-device checks run this file as a script in a
subprocess with `--xla_force_host_platform_device_count=8` (`python -m tests.test_parallel`); it prints the
facts it measured as JSON and the tests below assert on them. Everything else runs in-process on abstract meshes.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from contextblip_jax import parallel
from contextblip_jax.models import axes
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import MultiHeadAttention
from contextblip_jax.training import optim
from contextblip_jax.training.step import split_model
from tests.runs import facts_on_devices, run_config
from tests.tiny import tiny_contextblip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_SHAPES = {(8, 1, 1): (8, 1, 1), (2, 4, 1): (2, 4, 1), (2, 2, 2): (2, 2, 2), (-1, 2, 1): (4, 2, 1)}
BAD_SHAPES = [(3, 1, 1), (-1, -1, 2), (16, 1, 1)]
FORWARD_MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
# dotted path -> (PartitionSpec on the (2, 2, 2) mesh, global shape)
EXPECTED = {
    "blip.text.layers.0.fc1.kernel": (("fsdp", "tensor"), (32, 64)),
    "blip.text.layers.0.self_attn.query.kernel": (("fsdp", "tensor", None), (32, 4, 8)),
    "blip.text.layers.0.self_attn.out.kernel": (("tensor", None, "fsdp"), (4, 8, 32)),
    "blip.text.layers.0.self_norm.scale": (("fsdp",), (32,)),
    "blip.text.embeddings.word.embedding": (("tensor", "fsdp"), (30524, 32)),
    "blip.vision.patch_embed.kernel": ((None, None, None, "fsdp"), (8, 8, 3, 32)),
    "head.proj.bias": ((None,), (1,)),
}


def _create() -> ContextBLIP:
    return ContextBLIP(tiny_contextblip(), rngs=nnx.Rngs(0))


def _abstract_mesh(shape: tuple[int, ...]) -> AbstractMesh:
    return AbstractMesh(shape, axes.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def _by_path(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}


def _spec(spec: PartitionSpec) -> list:
    return [list(axis) if isinstance(axis, tuple) else axis for axis in spec]


# -- the 8-device script -----------------------------------------------------------------------------------------


def _mesh_facts() -> dict:
    good = {str(shape): dict(parallel.make_mesh(shape).shape) for shape in GOOD_SHAPES}
    errors = {}
    for shape in BAD_SHAPES:
        try:
            parallel.make_mesh(shape)
        except ValueError as error:
            errors[str(shape)] = str(error)
    return {"good": good, "errors": errors}


def _placement_facts(graphdef, state) -> dict:
    """The tiny model's shardings from its abstract state on a (2, 2, 2) mesh, applied to its real state."""
    mesh = parallel.make_mesh((2, 2, 2))
    shardings = parallel.param_shardings(nnx.state(nnx.eval_shape(_create)), mesh)
    placed = _by_path(parallel.shard_state(state, shardings))
    wanted = _by_path(shardings)
    original = _by_path(state)
    facts = {
        name: {
            "spec": _spec(placed[name].get_value().sharding.spec),
            "shape": list(placed[name].shape),
            "shard": list(placed[name].get_value().addressable_shards[0].data.shape),
        }
        for name in EXPECTED
    }
    facts["all_as_computed"] = all(placed[k].get_value().sharding == wanted[k].get_value() for k in placed)
    facts["values_kept"] = all(np.array_equal(placed[k].get_value(), original[k].get_value()) for k in placed)
    return facts


def _forward_facts(graphdef, state) -> dict:
    """Stage-2a logits and ITM hidden states, jitted with explicit shardings, on each mesh vs one device."""
    batch, candidates, length = 8, 10, 12  # 8 descriptions: the batch must divide over data × fsdp = 8
    key_images, key_ids = jax.random.split(jax.random.key(1))
    images = jax.random.normal(key_images, (batch, candidates, 32, 32, 3))
    input_ids = jax.random.randint(key_ids, (batch, length), 0, 30524)
    attention_mask = jnp.ones((batch, length), jnp.int32).at[:, 9:].set(0)

    def forward(state, images, input_ids, attention_mask):
        model = nnx.merge(graphdef, state)
        hidden = model.match(images[:, 0], input_ids, attention_mask).last_hidden_state
        return model.finetune_logits(images, input_ids, attention_mask), hidden

    def run(mesh):
        shardings = parallel.param_shardings(state, mesh)
        inputs = (images, input_ids, attention_mask)
        input_shardings = tuple(parallel.batch_sharding(mesh, x.ndim) for x in inputs)
        output_shardings = (parallel.batch_sharding(mesh, 2), parallel.batch_sharding(mesh, 3))
        step = jax.jit(forward, in_shardings=(shardings, *input_shardings), out_shardings=output_shardings)
        logits, hidden = step(parallel.shard_state(state, shardings), *jax.device_put(inputs, input_shardings))
        return np.asarray(logits), np.asarray(hidden), logits.sharding.spec

    ref_logits, ref_hidden, _ = run(parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
    facts = {"scale": [float(np.abs(ref_logits).max()), float(np.abs(ref_hidden).max())]}
    for shape in FORWARD_MESHES:
        logits, hidden, spec = run(parallel.make_mesh(shape))
        facts[str(shape)] = {
            "logits": float(np.abs(logits - ref_logits).max()),
            "hidden": float(np.abs(hidden - ref_hidden).max()),
            "spec": _spec(spec),
        }
    return facts


def _helper_facts() -> dict:
    """`init_sharded` (on a small module, to keep compilation short) and `with_logical_constraint` under jit."""
    mesh = parallel.make_mesh((2, 2, 2))

    def create():
        return MultiHeadAttention(32, 4, rngs=nnx.Rngs(3))

    eager = _by_path(nnx.state(create()))
    sharded = _by_path(nnx.state(parallel.init_sharded(create, mesh)))
    x = jnp.ones((8, 5, 32))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: axes.with_logical_constraint(2 * x, ("batch", None, "embed")))(x)
    return {
        "query_spec": _spec(sharded["query.kernel"].get_value().sharding.spec),
        "init_max_diff": max(float(np.abs(sharded[k].get_value() - eager[k].get_value()).max()) for k in eager),
        "constraint_spec": _spec(y.sharding.spec),
    }


def _facts() -> dict:
    assert jax.device_count() == 8, jax.devices()
    graphdef, state = nnx.split(_create())
    return {
        "mesh": _mesh_facts(),
        "placement": _placement_facts(graphdef, state),
        "forward": _forward_facts(graphdef, state),
        "helpers": _helper_facts(),
    }


@pytest.fixture(scope="module")
def facts() -> dict:
    return facts_on_devices("tests.test_parallel", 8)


# -- 8 simulated devices -------------------------------------------------------------------------------------------


@pytest.mark.long
def test_make_mesh_resolves_shapes_on_8_devices(facts):
    resolved = {shape: facts["mesh"]["good"][str(shape)] for shape in GOOD_SHAPES}
    assert resolved == {shape: dict(zip(axes.MESH_AXES, sizes, strict=True)) for shape, sizes in GOOD_SHAPES.items()}


@pytest.mark.long
@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_make_mesh_rejects_bad_shapes_on_8_devices(facts, shape):
    message = facts["mesh"]["errors"].get(str(shape))
    assert message is not None, f"{shape} did not raise ValueError"
    assert str(shape) in message and "8" in message, message


@pytest.mark.long
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameters_are_sharded_as_the_rules_say(facts, name):
    spec, shape = EXPECTED[name]
    fact = facts["placement"][name]
    assert fact["spec"] == list(spec) and fact["shape"] == list(shape)
    sizes = dict(zip(axes.MESH_AXES, (2, 2, 2), strict=True))
    assert fact["shard"] == [n // (sizes[axis] if axis else 1) for n, axis in zip(shape, spec, strict=True)]


@pytest.mark.long
def test_every_parameter_is_placed_as_computed_with_values_kept(facts):
    assert facts["placement"]["all_as_computed"]
    assert facts["placement"]["values_kept"]


@pytest.mark.long
@pytest.mark.parametrize("shape", FORWARD_MESHES)
def test_sharded_forward_matches_one_device(facts, shape):
    fact = facts["forward"][str(shape)]
    assert min(facts["forward"]["scale"]) > 1e-3  # the comparison below is not vacuous
    assert fact["logits"] <= 1e-5 and fact["hidden"] <= 1e-5, fact
    assert fact["spec"] == [["data", "fsdp"], None]


@pytest.mark.long
def test_init_sharded_and_activation_constraint(facts):
    helpers = facts["helpers"]
    assert helpers["query_spec"] == ["fsdp", "tensor", None]
    assert helpers["init_max_diff"] <= 1e-6
    batch, *rest = helpers["constraint_spec"]  # jax drops trailing Nones from an output's spec
    assert batch == ["data", "fsdp"] and not any(rest)  # `embed` would be fsdp, which `batch` already holds


# -- in-process, abstract meshes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 1, 1), "needs 3 devices, but there are 8"),
        ((-1, -1, 2), "at most one axis may be -1"),
        ((-1, 3, 1), "do not divide the 8 devices"),
        ((2, 2), "must give 3 sizes"),
        ((0, 8, 1), "positive integers"),
    ],
)
def test_resolve_mesh_shape_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        parallel.resolve_mesh_shape(shape, 8)


def test_make_mesh_on_this_process():
    assert dict(parallel.make_mesh((-1, 1, 1)).shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=f"needs {2 * jax.device_count()} devices"):
        parallel.make_mesh((2 * jax.device_count(), 1, 1))


def test_rules_from_config_override_the_defaults():
    rules = axes.logical_rules([("embed", None), ["mlp", ["fsdp", "tensor"]]])
    assert rules[:2] == (("embed", None), ("mlp", ("fsdp", "tensor")))
    assert dict(rules)["heads"] == "tensor" and len(dict(rules)) == len(axes.DEFAULT_RULES)
    assert axes.logical_spec(("embed", "mlp"), (32, 64), _abstract_mesh((2, 2, 2)), rules) == PartitionSpec(
        None, ("fsdp", "tensor")
    )
    with pytest.raises(ValueError, match="model"):
        axes.logical_rules([("embed", "model")])


def test_indivisible_dimensions_are_replicated():
    mesh = _abstract_mesh((1, 2, 8))
    params = _by_path(parallel.param_shardings(nnx.state(nnx.eval_shape(_create)), mesh))
    assert params["blip.text.embeddings.word.embedding"].get_value().spec == PartitionSpec(None, "fsdp")  # 30524 % 8
    assert params["context.layers.0.self_attn.query.kernel"].get_value().spec == PartitionSpec("fsdp", None, None)
    assert params["blip.text.layers.0.self_attn.query.kernel"].get_value().spec == PartitionSpec("fsdp", None, None)
    assert params["blip.text.layers.0.fc1.kernel"].get_value().spec == PartitionSpec("fsdp", "tensor")


def test_the_trainers_optimizer_state_follows_its_parameters():
    """`optimizer_shardings` on the optimizer `programs.build` makes (two rate groups, clipping): each Adam moment
    in its parameter's sharding, counts replicated, in the state's own structure (what `jax.jit` needs)."""
    mesh = _abstract_mesh((1, 2, 8))
    model = nnx.eval_shape(_create)
    _, trainable, _ = split_model(model, nnx.Param)
    params = {k: v for k, v in parallel.flat_param_shardings(model, mesh).items() if k in trainable}
    config = run_config("unused").optimizer
    config.update(head_pattern=r"^head\.", clip_norm=1.0)
    opt_state = jax.eval_shape(optim.build_optimizer(config, trainable, 10).init, trainable)
    shardings = parallel.optimizer_shardings(opt_state, params, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(opt_state)
    moments = 0
    for path, sharding in jax.tree_util.tree_leaves_with_path(shardings):
        if getattr(path[-2], "name", None) in ("mu", "nu"):
            moments += 1
            assert sharding == params[path[-1].key], path
        else:
            assert sharding.spec == PartitionSpec(), path
    assert moments == 2 * len(trainable)
    assert params["blip.text.layers.0.fc1.kernel"].spec == PartitionSpec("fsdp", "tensor")  # not a vacuous check


def test_batch_sharding_and_divisibility():
    mesh = _abstract_mesh((2, 4, 1))
    assert parallel.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert parallel.batch_sharding(mesh, 4).spec == PartitionSpec(("data", "fsdp"), None, None, None)
    parallel.check_batch(16, mesh)
    with pytest.raises(ValueError, match=r"global batch 36 .* data-parallel size 8"):
        parallel.check_batch(36, mesh)


def test_logical_constraint_is_a_no_op_without_a_mesh():
    x = jnp.ones((4, 32))
    assert axes.with_logical_constraint(x, ("batch", "embed")) is x


CLUSTER_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_NUM_SLICES",
)


@pytest.mark.parametrize(
    ("arguments", "environment", "expected"),
    [
        ((None, None, None), {}, None),
        ((None, None, None), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ((None, None, None), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),
        ((None, None, None), {"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, {}),
        ((None, None, None), {"TPU_WORKER_HOSTNAMES": "host-0"}, None),
        (("10.0.0.1:1234", 2, 1), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, ("10.0.0.1:1234", 2, 1)),
        (("auto", None, None), {}, (None, None, None)),
        ((None, 1, 0), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),
    ],
)
def test_initialize_distributed(monkeypatch, arguments, environment, expected):
    for variable in CLUSTER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    started = parallel.initialize_distributed(*arguments)
    if expected is None:
        assert not started and not calls
    elif expected == {}:
        assert started and calls == [{}]  # jax's own cluster detection fills in everything
    else:
        keys = ("coordinator_address", "num_processes", "process_id")
        assert started and calls == [dict(zip(keys, expected, strict=True))]


def test_initialize_distributed_rejects_a_process_id_out_of_range(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="process_id 2"):
        parallel.initialize_distributed("10.0.0.1:1234", 2, 2)


if __name__ == "__main__":
    print(json.dumps(_facts()))
