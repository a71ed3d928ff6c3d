"""Random PyTorch BLIP retrieval models for parity tests, and the inputs to feed both implementations.

The references are Hugging Face's own `BlipForImageTextRetrieval`, built locally with random weights (no
hub access); the original salesforce/BLIP naming is produced by a hand-written rename table below.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # Same width in both towers.
    "tiny_a": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=120,
            max_position_embeddings=24,
        ),
        embed_dim=16,
    ),
    # Vision wider than text (cross-attention keys/values take 48), odd grid, more layers.
    "tiny_b": dict(
        vision=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=6,
            image_size=48,
            patch_size=16,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=8,
            vocab_size=100,
            max_position_embeddings=20,
        ),
        embed_dim=8,
    ),
    # Text wider than vision, one head in vision, larger image.
    "tiny_c": dict(
        vision=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=64,
            patch_size=16,
        ),
        text=dict(
            hidden_size=40,
            intermediate_size=80,
            num_hidden_layers=3,
            num_attention_heads=5,
            vocab_size=90,
            max_position_embeddings=16,
        ),
        embed_dim=12,
    ),
}

BASE_CONFIG: dict[str, Any] = dict(
    vision=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=384,
        patch_size=16,
    ),
    text=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=30524,
        max_position_embeddings=512,
    ),
    embed_dim=256,
)


def hf_config(spec: dict[str, Any], vision_eps: float = 1e-5):
    from transformers import BlipConfig

    vision = dict(spec["vision"], initializer_range=0.02, layer_norm_eps=vision_eps)
    text = dict(spec["text"], bos_token_id=None, sep_token_id=None, pad_token_id=0)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=spec["embed_dim"])


def hf_model(spec: dict[str, Any], seed: int = 0, vision_eps: float = 1e-5):
    """A random `BlipForImageTextRetrieval` in eval mode; biases and LayerNorms randomised too, and the heads
    scaled up so that ITM logits are O(1) and a numerical slip shows well above the tolerance."""
    import torch
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(hf_config(spec, vision_eps)).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
            if name.split(".")[0] in ("itm_head", "vision_proj", "text_proj"):
                tensor.mul_(25.0)
    return model


@dataclasses.dataclass
class Inputs:
    images_nchw: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def images_nhwc(self) -> np.ndarray:
        return self.images_nchw.transpose(0, 2, 3, 1)


def make_inputs(spec: dict[str, Any], batch: int = 4, seed: int = 0) -> Inputs:
    """Normalised-looking images and padded texts of different lengths (one uses every position)."""
    rng = np.random.default_rng(seed)
    size = spec["vision"]["image_size"]
    length = spec["text"]["max_position_embeddings"]
    images = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    ids = rng.integers(1, spec["text"]["vocab_size"], size=(batch, length)).astype(np.int64)
    lengths = [length, *list(rng.integers(2, length, size=batch - 1))]
    mask = (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return Inputs(images, ids * mask, mask)


def torch_outputs(model, inputs: Inputs) -> dict[str, np.ndarray]:
    import torch

    images = torch.tensor(inputs.images_nchw)
    ids, mask = torch.tensor(inputs.input_ids), torch.tensor(inputs.attention_mask)
    with torch.no_grad():
        itm = model(input_ids=ids, pixel_values=images, attention_mask=mask).itm_score
        itc = model(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False).itm_score
        features = model.vision_model(pixel_values=images).last_hidden_state
    return {"itm": itm.numpy(), "itc": itc.numpy(), "features": features.numpy()}


def jax_outputs(model, inputs: Inputs) -> dict[str, np.ndarray]:
    images = inputs.images_nhwc
    ids, mask = inputs.input_ids.astype(np.int32), inputs.attention_mask.astype(np.int32)
    return {
        "itm": np.asarray(model.itm_logits(images, ids, mask)),
        "itc": np.asarray(model.itc_similarity(images, ids, mask)),
        "features": np.asarray(model.image_features(images)),
    }


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {key: float(np.max(np.abs(a[key] - b[key]))) for key in a}


# Hugging Face name -> original salesforce/BLIP name, written out independently of the converter.
_HF_TO_ORIGINAL = (
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
)


def original_state_dict(model, with_extras: bool = True) -> dict[str, Any]:
    """`model`'s weights under salesforce/BLIP names, plus the entries a real `.pth` also holds."""
    import torch

    state = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in _HF_TO_ORIGINAL:
            name = re.sub(pattern, replacement, name)
        state[name] = tensor.clone()
    if with_extras:
        for name in list(state):
            for prefix in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
                if name.startswith(prefix + "."):
                    state[f"{prefix}_m" + name[len(prefix) :]] = state[name] + 1.0
        width = state["vision_proj.weight"].shape[0]
        state.update(
            {
                "image_queue": torch.randn(width, 57),
                "text_queue": torch.randn(width, 57),
                "idx_queue": torch.zeros(1, 57),
                "ptr_queue": torch.zeros(1, dtype=torch.long),
                "temp": torch.tensor(0.07),
                "text_encoder.embeddings.position_ids": torch.arange(8)[None],
                "text_decoder.cls.predictions.bias": torch.randn(11),
                "text_decoder.bert.embeddings.word_embeddings.weight": torch.randn(11, 4),
            }
        )
    return state


def save_hf(model, folder: str) -> str:
    model.save_pretrained(folder)
    return folder


def save_original(model, path: str) -> str:
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": original_state_dict(model)}, path)
    return path
