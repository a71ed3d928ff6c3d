"""`init="torch"`: the parts ContextBLIP adds drawn as the authors' PyTorch code draws them (`nn.Linear` U(±1/sqrt(
fan_in)) kernels and biases, `nn.Embedding`/`torch.randn` N(0, 1) tables), BLIP's towers and TMIM's BERT decoder
layers as `bert` draws them; at random and when BLIP weights are loaded.

Statistical checks allow `SIGMAS` standard errors of each estimate for its sample size: the standard deviation
of n draws of U(-b, b) has relative standard error sqrt(0.2/n), of N(0, 1) 1/sqrt(2n); a mean of N(0, 1), 1/sqrt(n).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from flax import nnx

from contextblip_jax.convert import load_contextblip
from contextblip_jax.convert.directory import write_converted
from contextblip_jax.models.config import AdapterConfig, ContextBLIPConfig
from contextblip_jax.models.context import InterContextEncoder
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.layers import Dense, dotted_path, redraw_torch
from tests.tiny import tiny_contextblip

TINY = tiny_contextblip()
CONFIG = tiny_contextblip(
    adapter=AdapterConfig(levels=(1, 2, 3, 4), conv_kernels=(3,)),  # the convolution branch and the mask head too
    tmim=dataclasses.replace(TINY.tmim, mask_prediction=True),
)
SIGMAS = 5
UNIFORM = re.compile(
    r"^(adapter|tmim\.text_adapter|tmim\.head|mask_head|head\.proj|context\.layers\.\d+\.(self_attn\.\w+|fc1|fc2))\."
    r"(.+\.)?(kernel|bias)$"
)
"""The authors' `nn.Linear`s: adapter (multiscale_adapter.py:57, 69), TMIM text adapter (:25-27, 181) and pixel
head (:176), scoring head (finetune_notf.py:57), inter-context layers (extras.py:22-24, 66, 93, 108); the mask
head and the convolution branch, which the authors lack, as `nn.Linear` and `nn.Conv2d`."""
NORMAL = ("tmim.mask_token", "tmim.position", "context.position")
"""`torch.randn` (multiscale_adapter.py:177) and `nn.Embedding`s (multiscale_adapter.py:175, finetune_context.py:58)."""


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {dotted_path(path): np.array(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def build(config: ContextBLIPConfig, init: str, seed: int = 0) -> dict[str, np.ndarray]:
    return flat_params(ContextBLIP(dataclasses.replace(config, init=init), rngs=nnx.Rngs(seed)))


def fan_ins(model: nnx.Module) -> dict[str, int]:
    """Each dense and convolution parameter's fan-in, as `nn.Linear` and `nn.Conv2d` count it."""
    fans = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense | nnx.Conv):
            fan = int(np.prod(node.in_shape if isinstance(node, Dense) else node.kernel.shape[:-1]))
            fans.update({dotted_path((*path, name)): fan for name in ("kernel", "bias")})
    return fans


def assert_uniform_std(values: np.ndarray, name: str) -> None:
    """`values` (scaled to U(-1, 1)) have standard deviation 1/sqrt(3) within SIGMAS standard errors."""
    tolerance = SIGMAS * np.sqrt(0.2 / values.size)
    assert abs(values.std() * np.sqrt(3) - 1) < tolerance, (name, values.size, values.std() * np.sqrt(3))


def assert_standard_normal(values: np.ndarray, name: str) -> None:
    assert abs(values.mean()) < SIGMAS / np.sqrt(values.size), (name, values.mean())
    assert abs(values.std() - 1) < SIGMAS / np.sqrt(2 * values.size), (name, values.size, values.std())


def test_torch_init_draws_pytorch_defaults_for_the_fresh_parts_and_bert_for_the_rest():
    model = ContextBLIP(dataclasses.replace(CONFIG, init="torch"), rngs=nnx.Rngs(0))
    torch, bert = flat_params(model), build(CONFIG, "bert")
    expected = {name for name in bert if UNIFORM.match(name) or name in NORMAL}
    assert {name for name in bert if not np.array_equal(torch[name], bert[name])} == expected
    assert {name.split(".")[0] for name in expected} == {"adapter", "tmim", "mask_head", "head", "context"}

    fans = fan_ins(model)
    pooled: dict[str, list[np.ndarray]] = {"kernel": [], "bias": []}
    for name in sorted(n for n in expected if UNIFORM.match(n)):
        unit = torch[name].ravel() * np.sqrt(fans[name])  # U(±1/sqrt(fan_in)) scaled to U(-1, 1)
        assert np.abs(unit).max() <= 1, name
        if unit.size >= 1000:
            assert_uniform_std(unit, name)
        pooled[name.rsplit(".", 1)[1]].append(unit)
    for kind, units in pooled.items():
        assert_uniform_std(np.concatenate(units), f"all {kind}s")
    for name in NORMAL:
        assert_standard_normal(torch[name].ravel(), name)
    for layer in model.context.layers:  # nn.LayerNorm / BertLayerNorm: ones and zeros
        for norm in (layer.self_norm, layer.mlp_norm):
            np.testing.assert_array_equal(norm.scale[...], 1)
            np.testing.assert_array_equal(norm.bias[...], 0)


def test_torch_init_traces_and_jits():
    """`nnx.eval_shape` builds the whole model (conversion does); jitted, the draws are the eager ones (within an
    ulp: XLA may divide by the scale as a multiplication by its reciprocal). A jitted whole model compiles for
    half a minute here, so the jitted check builds the inter-context encoder alone."""
    config = dataclasses.replace(TINY, init="torch")
    shapes = nnx.eval_shape(lambda: ContextBLIP(config, rngs=nnx.Rngs(0)))
    traced = {dotted_path(path): var.shape for path, var in nnx.to_flat_state(nnx.state(shapes, nnx.Param))}
    assert traced == {name: value.shape for name, value in build(TINY, "torch").items()}

    def encoder() -> InterContextEncoder:
        rngs = nnx.Rngs(0)
        module = InterContextEncoder(TINY.context, TINY.blip.text.width, rngs=rngs)
        redraw_torch([module.layers], [module.position], rngs)
        return module

    eager, jitted = flat_params(encoder()), flat_params(nnx.jit(encoder)())
    assert np.abs(eager["position"]).std() > 0.5  # redrawn from N(0, 1), not N(0, 0.02)
    for name, value in eager.items():
        np.testing.assert_array_max_ulp(jitted[name], value, maxulp=1)


def test_loaded_blip_keeps_its_weights_and_torch_draws_the_parts_it_lacks(tmp_path):
    given = {name[len("blip.") :]: value for name, value in build(TINY, "bert", seed=7).items() if name[:5] == "blip."}
    folder = str(tmp_path / "blip")
    write_converted(
        folder,
        config_json=TINY.blip.to_json(),
        params=given,
        metadata={"dtype": "float32", "model": "blip"},
        tokenizer_dir=None,
    )
    model = load_contextblip(folder, seed=3, init="torch")
    loaded = flat_params(model)
    assert model.config.init == "torch" and np.std(loaded["context.position"]) > 0.5  # N(0, 1), not N(0, 0.02)
    fresh = build(ContextBLIPConfig(blip=TINY.blip), "torch", seed=3)
    for name, value in loaded.items():
        reference = given[name[len("blip.") :]] if name[:5] == "blip." else fresh[name]
        np.testing.assert_array_equal(value, reference, err_msg=name)
    assert load_contextblip(folder, seed=3).config.init == "bert"
