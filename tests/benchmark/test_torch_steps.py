"""The PyTorch side computes what the JAX step computes, on the JAX model's weights; the agreement check catches a
torch side that computes something else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contextblip_jax.benchmark import __main__ as cli
from contextblip_jax.benchmark import jax_steps, torch_steps

pytestmark = pytest.mark.long  # each compiles a JAX step and runs a torch model


@pytest.fixture(params=[("finetune", True), ("zeroshot", False)], ids=["train", "eval"])
def sides(request):
    stage, train = request.param
    setup = jax_steps.Setup("tiny", stage, train)
    batch = jax_steps.random_batch(setup)
    jax_side, params = jax_steps.prepare(setup, batch, keep_params=True)
    return setup, batch, jax_side, params


def test_torch_agrees_with_jax_and_trains(sides):
    setup, batch, jax_side, params = sides
    torch_side, _ = torch_steps.prepare(setup, batch, params, compile_model=False)
    found = cli.agreement("torch", jax_side, torch_side, setup, params)
    assert found["first"] <= 1e-4
    if setup.train:
        assert found["update"] <= cli.UPDATE_TOLERANCE
    if setup.train:  # the torch step updates its weights: the next loss differs, as JAX's does
        assert float(torch_side.call()) != pytest.approx(float(torch_side.first), abs=1e-6)
        assert float(jax_side.call()) != pytest.approx(float(jax_side.first), abs=1e-6)
    else:
        scores = torch_side.first
        assert scores.shape == (setup.descriptions, setup.candidates) and np.ptp(scores) > 1e-3


def test_a_torch_side_without_its_adapter_is_caught(sides, monkeypatch):
    setup, batch, jax_side, params = sides
    monkeypatch.setattr(torch_steps.Adapter, "forward", lambda self, final, hidden_states, norm: final)
    torch_side, _ = torch_steps.prepare(setup, batch, params, compile_model=False)
    with pytest.raises(SystemExit, match="computes something else"):
        cli.agreement("torch", jax_side, torch_side, setup, params)


def test_a_torch_side_whose_update_differs_is_caught_though_its_first_loss_agrees(sides, monkeypatch):
    """A torch Adam at twice the learning rate gives the same first loss and another update."""
    setup, batch, jax_side, params = sides
    if not setup.train:
        pytest.skip("scoring has no update")
    build = torch_steps.build_model

    def doubled(setup, params, optimizer_config, device):
        faster = optimizer_config.copy_and_resolve_references()
        faster.lr, faster.head_lr = 2 * faster.lr, 2 * faster.head_lr
        return build(setup, params, faster, device)

    monkeypatch.setattr(torch_steps, "build_model", doubled)
    torch_side, _ = torch_steps.prepare(setup, batch, params, compile_model=False)
    assert abs(float(torch_side.first) - float(jax_side.first)) <= 1e-4 * abs(float(jax_side.first))
    with pytest.raises(SystemExit, match="updates the parameters otherwise"):
        cli.agreement("torch", jax_side, torch_side, setup, params)


def test_weights_go_back_to_hugging_face_names_exactly():
    """The converter's rules run backwards, then forwards again through the converter, give the JAX tensors."""
    from contextblip_jax.convert.mapping import blip_rules

    setup = jax_steps.Setup("tiny", "finetune", True)
    _, params = jax_steps.prepare(setup, jax_steps.random_batch(setup), keep_params=True)
    state = torch_steps.hf_state_dict(setup.config.blip, params)
    for path, rule in blip_rules(setup.config.blip).items():
        name = "blip." + ".".join(map(str, path))
        back = rule.apply(state[rule.key].numpy(), params[name].shape)
        np.testing.assert_array_equal(back, params[name], err_msg=name)
    assert isinstance(state["vision_model.embeddings.class_embedding"], torch.Tensor)


@pytest.mark.parametrize(("train", "stage"), [(True, "context"), (True, "pretrain"), (False, "finetune")])
def test_a_step_the_port_lacks_is_refused_before_anything_is_built(train, stage):
    setup = jax_steps.Setup(preset="tiny", stage=stage, train=train)
    ported = r"measures --measure=train --stage=finetune and --measure=eval --stage=zeroshot"
    with pytest.raises(ValueError, match=ported):
        torch_steps.prepare(setup, {}, {}, compile_model=False)


def test_a_side_sharing_the_torch_model_starts_again_from_the_jax_weights(sides):
    """The eager side's first step updates the shared model; the next side's first output must not see it."""
    setup, batch, _, params = sides
    eager, shared = torch_steps.prepare(setup, batch, params, compile_model=False)
    eager.call()  # a second update of the shared weights
    again, held = torch_steps.prepare(setup, batch, params, compile_model=False, shared=shared)
    assert held is shared
    np.testing.assert_allclose(again.first, eager.first, rtol=1e-6, atol=1e-6)
