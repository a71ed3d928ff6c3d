"""Import of the ContextBLIP authors' checkpoints, checked against PyTorch references of their modules.

The references are built here from transformers' own BLIP and BERT layers plus a few torch lines for the
adapter and heads, named as in the authors' code; nothing in them reuses the converter's mapping.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertConfig, BertLayer

from contextblip_jax.convert import load_contextblip
from contextblip_jax.models.blip import l2_normalize
from tests import blip_factory as bf
from tests.convert.test_parity import TOLERANCE, run_convert

SPEC = bf.TINY_CONFIGS["tiny_a"]  # ViT 32 wide, 2 blocks; text 32 wide, 2 layers, 2 heads
WIDTH = 32
LEVELS = 2  # the authors' adapter reads 4 levels of a 12-block ViT; here every block of a 2-block one


def bert_layer(cross: bool, heads: int) -> BertLayer:
    config = BertConfig(
        hidden_size=WIDTH,
        num_attention_heads=heads,
        intermediate_size=48,
        is_decoder=cross,
        add_cross_attention=cross,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    layer = BertLayer(config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


class AuthorsReference:
    """The authors' parts in PyTorch, with their parameter names."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.blip = bf.hf_model(SPEC, seed=seed, vision_eps=1e-6)
        self.down = nn.ModuleList([nn.Linear(WIDTH, WIDTH // 2, bias=False) for _ in range(LEVELS)])
        self.up = nn.Linear(WIDTH // 2 * LEVELS, WIDTH, bias=False)
        self.prediction_layer = nn.Linear(WIDTH, 1)
        self.transformer = nn.ModuleList([bert_layer(False, 8) for _ in range(2)])
        self.positional_emb = nn.Embedding(10, WIDTH)
        self.decoder = nn.ModuleList([bert_layer(True, 8)])
        self.text_adapter = nn.Sequential(
            nn.Linear(WIDTH, WIDTH // 2, bias=False), nn.ReLU(), nn.Linear(WIDTH // 2, WIDTH, bias=False), nn.ReLU()
        )
        self.mask_embed = torch.randn(WIDTH)
        self.decoder_pos_embed = nn.Embedding(17, WIDTH)
        self.recon_head = nn.Linear(WIDTH, 8 * 8 * 3)

    def state_dict(self, stage: str) -> dict[str, torch.Tensor]:
        blip = {f"pretrained_blip.{k}": v for k, v in bf.original_state_dict(self.blip, with_extras=False).items()}
        blip.update(
            {f"vision_adapter.down.{i}.fc.0.weight": d.weight.detach().clone() for i, d in enumerate(self.down)}
        )
        blip["vision_adapter.up.fc.0.weight"] = self.up.weight.detach().clone()
        if stage == "pretrain":
            blip.update({f"visual_decoder.encoder.layer.0.{k}": v for k, v in self.decoder[0].state_dict().items()})
            blip.update(
                {
                    "mask_embed": self.mask_embed,
                    "decoder_pos_embed.weight": self.decoder_pos_embed.weight,
                    "recon_head.weight": self.recon_head.weight,
                    "recon_head.bias": self.recon_head.bias,
                    "text_adapter.fc.0.weight": self.text_adapter[0].weight,
                    "text_adapter.fc.2.weight": self.text_adapter[2].weight,
                    "visual_decoder.embeddings.position_ids": torch.arange(17)[None],
                }
            )
            return {k: v.detach().clone() for k, v in blip.items()}
        head = {f"prediction_layer.{k}": v for k, v in self.prediction_layer.state_dict().items()}
        finetuned = {f"blip.{k}": v for k, v in blip.items()} | head
        if stage == "finetune":
            return finetuned
        context = {
            f"transformer.{i}.{k}": v for i, layer in enumerate(self.transformer) for k, v in layer.state_dict().items()
        }
        return (
            {f"blip.{k}": v for k, v in finetuned.items()}
            | context
            | {"positional_emb.weight": self.positional_emb.weight.detach().clone()}
        )

    @torch.no_grad()
    def adapted(self, images: torch.Tensor) -> torch.Tensor:
        vision = self.blip.vision_model(pixel_values=images, output_hidden_states=True)
        norm = self.blip.vision_model.post_layernorm
        latent = torch.cat([torch.relu(d(norm(vision.hidden_states[i + 1]))) for i, d in enumerate(self.down)], -1)
        return vision.last_hidden_state + torch.relu(self.up(latent))

    @torch.no_grad()
    def first_tokens(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.adapted(images)
        out = self.blip.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=tokens,
            encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long),
        )
        first = out.last_hidden_state[:, 0]
        return first / first.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def context_logits(self, x: torch.Tensor, is_video: float) -> torch.Tensor:
        h = (x + self.positional_emb(torch.arange(10)) * is_video)[None]
        for layer in self.transformer:
            h = layer(h)
        return self.prediction_layer(h[0] + x)[..., 0]


def save(reference: AuthorsReference, stage: str, tmp_path) -> str:
    path = tmp_path / f"{stage}.pt"
    torch.save({"model_state_dict": reference.state_dict(stage)}, path)
    return str(path)


HEADS = {
    "blip": {"vision": {"num_heads": 4}, "text": {"num_heads": 2}},
    "adapter": {"levels": [1, 2]},
    "context": {"num_heads": 8},
    "tmim": {"decoder_heads": 8},
}


@pytest.fixture(scope="module")
def reference():
    return AuthorsReference()


def inputs(count: int = 10):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((count, 3, 32, 32)).astype(np.float32)
    ids = np.array([[30, 5, 9, 77, 3, 0, 0]] * count)
    return images, ids, (ids > 0).astype(np.int64)


def test_finetuned_file_gives_the_authors_candidate_logits(reference, tmp_path):
    model = load_contextblip(save(reference, "finetune", tmp_path), model_config=HEADS)
    images, ids, mask = inputs()
    expected = (
        reference.prediction_layer(reference.first_tokens(torch.tensor(images), torch.tensor(ids), torch.tensor(mask)))[
            ..., 0
        ]
        .detach()
        .numpy()
    )
    logits = model.finetune_logits(
        images.transpose(0, 2, 3, 1)[None], ids[:1].astype(np.int32), mask[:1].astype(np.int32)
    )
    assert np.abs(np.asarray(logits[0]) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("is_video", [0.0, 1.0])
def test_context_file_gives_the_authors_context_logits(reference, tmp_path, is_video):
    model = load_contextblip(save(reference, "context", tmp_path), model_config=HEADS)
    x = np.random.default_rng(1).standard_normal((1, 10, WIDTH)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    expected = reference.context_logits(torch.tensor(x[0]), is_video).numpy()
    ours = model.head(model.context(l2_normalize(x), np.array([is_video])))
    assert np.abs(np.asarray(ours[0]) - expected).max() <= TOLERANCE


@pytest.mark.long
def test_pretrain_file_through_cli_maps_decoder_and_adapters(reference, tmp_path):
    out = tmp_path / "converted"
    result = run_convert(
        "--input", save(reference, "pretrain", tmp_path), "--output", str(out), "--model-config", json.dumps(HEADS)
    )
    assert result.returncode == 0, result.stderr
    with open(out / "conversion.json") as f:
        metadata = json.load(f)
    assert metadata["model"] == "contextblip" and metadata["stage"] == "pretrain"
    assert metadata["initialised"] == ["head", "context"] and metadata["itm_first_token"] == "enc"
    model = load_contextblip(str(out))
    images, _, _ = inputs(2)
    adapted, _ = model.adapted_features(images.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(adapted, reference.adapted(torch.tensor(images)).numpy(), atol=TOLERANCE)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 17, WIDTH)).astype(np.float32)
    text = rng.standard_normal((2, 5, WIDTH)).astype(np.float32)
    text_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        adapted_text = torch.tensor(text) + reference.text_adapter(torch.tensor(text))
        additive = (1.0 - torch.tensor(text_mask, dtype=torch.float32))[:, None, None, :] * -1e9
        expected = reference.decoder[0](
            torch.tensor(x), encoder_hidden_states=adapted_text, encoder_attention_mask=additive
        )
        expected = reference.recon_head(expected).numpy()
    h, _ = model.tmim.layers[0](x, None, model.tmim.text_adapter(text), text_mask)
    np.testing.assert_allclose(model.tmim.head(h), expected, atol=TOLERANCE)
    np.testing.assert_allclose(model.tmim.mask_token[...], reference.mask_embed.numpy())
    np.testing.assert_allclose(model.tmim.position[...], reference.decoder_pos_embed.weight.detach().numpy())


def test_plain_blip_becomes_a_contextblip_with_fresh_parts(tmp_path):
    folder = bf.save_hf(bf.hf_model(SPEC), str(tmp_path / "hf"))
    out = tmp_path / "converted"
    assert run_convert("--input", folder, "--output", str(out), "--target", "contextblip").returncode == 0
    with open(out / "conversion.json") as f:
        assert json.load(f)["initialised"] == ["adapter", "tmim", "head", "context"]
    from_dir, from_source = load_contextblip(str(out)), load_contextblip(folder)
    images, _, _ = inputs(2)
    np.testing.assert_array_equal(
        np.asarray(from_dir.adapted_features(images.transpose(0, 2, 3, 1))[0]),
        np.asarray(from_source.adapted_features(images.transpose(0, 2, 3, 1))[0]),
    )


def test_authors_file_problems_are_named(reference, tmp_path):
    state = reference.state_dict("finetune")
    state.pop("blip.vision_adapter.up.fc.0.weight")
    state["blip.mystery.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save({"model_state_dict": state}, path)
    result = run_convert("--input", str(path), "--output", str(tmp_path / "out"), "--model-config", json.dumps(HEADS))
    assert result.returncode != 0
    assert "missing key vision_adapter.up.fc.0.weight" in result.stderr and "unused key mystery.weight" in result.stderr
