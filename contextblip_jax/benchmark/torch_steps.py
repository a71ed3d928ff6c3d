"""The PyTorch side of the benchmark: the same stage-2a train step and zero-shot scoring, written the way a user of
the authors' code runs them: transformers' BLIP towers (`BlipForImageTextRetrieval`) with the multi-level adapter
and the scoring head as small torch modules (as the authors' `models/multiscale_adapter.py` and
`finetune_notf.py`), `torch.optim.Adam` with the same two parameter groups, eager or under `torch.compile` (one
model and optimizer shared by both).

It holds the JAX model's own weights: each BLIP tensor is filled through the converter's rules run backwards
(a rule moves entries, so applying it to an array of source indices says where every entry came from).

Imports: its own package (`benchmark`), `compile`, `convert`, `models`, `runconfig`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from absl import logging
from torch import nn

from contextblip_jax.compile import hardware
from contextblip_jax.convert.mapping import blip_rules
from contextblip_jax.models.config import BlipConfig, ContextBLIPConfig

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}


def hf_config(config: BlipConfig) -> transformers.BlipConfig:
    """The Hugging Face config of the same BLIP (no dropout, as the JAX towers in fine-tuning)."""
    v, t = config.vision, config.text
    vision = dict(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
        hidden_act=HF_ACTIVATIONS[v.activation],
    )  # fmt: skip
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.width, encoder_hidden_size=t.encoder_width, intermediate_size=t.mlp_dim,
        num_hidden_layers=t.depth, num_attention_heads=t.num_heads, max_position_embeddings=t.max_positions,
        layer_norm_eps=t.layer_norm_eps, hidden_act=HF_ACTIVATIONS[t.activation], bos_token_id=None,
        sep_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return transformers.BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=config.embed_dim)


def hf_state_dict(
    config: BlipConfig, params: Mapping[str, np.ndarray], prefix: str = "blip.", only: re.Pattern | None = None
) -> dict[str, Any]:
    """Hugging Face tensors holding the JAX BLIP parameters `params[prefix + dotted path]`; `only`: just the
    tensors filled from JAX names it matches (whole blocks, so that a fused tensor gets all its parts)."""
    flat: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path, rule in blip_rules(config).items():
        if only is not None and not only.search(prefix + ".".join(map(str, path))):
            continue
        value = np.asarray(params[prefix + ".".join(map(str, path))], np.float32)
        source = tuple(rule.source_shape(value.shape))
        index = np.arange(math.prod(source)).reshape(source)
        origin = index if path[-1] == "pos_embed" else rule.apply(index, value.shape)  # same grid: no resampling
        buffer = flat.setdefault(rule.key, np.zeros(math.prod(source), np.float32))
        buffer[np.asarray(origin).ravel()] = value.ravel()
        shapes[rule.key] = source
    return {key: torch.from_numpy(buffer.reshape(shapes[key])) for key, buffer in flat.items()}


class Adapter(nn.Module):
    """`out = x + ReLU(concat_k ReLU(LN(h_k) W_down_k) W_up)` over the ViT blocks `levels` (1-indexed)."""

    def __init__(self, levels: tuple[int, ...], width: int, hidden: int):
        super().__init__()
        self.levels = levels
        self.down = nn.ModuleList(nn.Linear(width, hidden, bias=False) for _ in levels)
        self.up = nn.Linear(hidden * len(levels), width, bias=False)

    def forward(self, final: torch.Tensor, hidden_states: tuple[torch.Tensor, ...], norm: nn.Module) -> torch.Tensor:
        # Hugging Face's hidden_states[0] is the embedding output; block k's output is hidden_states[k].
        pairs = zip(self.down, self.levels, strict=True)
        latent = torch.cat([F.relu(down(norm(hidden_states[k]))) for down, k in pairs], -1)
        return final + F.relu(self.up(latent))


class TorchContextBLIP(nn.Module):
    """Stage 2a's logits and the zero-shot ITM scores of ContextBLIP over [B, C, H, W, 3] candidates."""

    def __init__(self, config: ContextBLIPConfig):
        super().__init__()
        vision, text = config.blip.vision, config.blip.text
        self.blip = transformers.BlipForImageTextRetrieval(hf_config(config.blip))
        levels = config.adapter.resolved_levels(vision.depth)
        self.adapter = Adapter(tuple(levels), vision.width, vision.width // config.adapter.reduction)
        self.head = nn.Linear(text.width, 1)
        scale = config.head.logit_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale))) if scale else None

    def first_tokens(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, count = images.shape[:2]
        pixels = images.reshape(batch * count, *images.shape[2:]).permute(0, 3, 1, 2)
        out = self.blip.vision_model(pixel_values=pixels, output_hidden_states=True)
        adapted = self.adapter(out.last_hidden_state, out.hidden_states, self.blip.vision_model.post_layernorm)
        image_mask = torch.ones(adapted.shape[:2], dtype=torch.long, device=adapted.device)
        text = self.blip.text_encoder(
            input_ids=ids.repeat_interleave(count, 0),
            attention_mask=mask.repeat_interleave(count, 0),
            encoder_hidden_states=adapted,
            encoder_attention_mask=image_mask,
        )
        return text.last_hidden_state[:, 0].reshape(batch, count, -1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, zero_shot: bool = False):
        first = self.first_tokens(images, ids, mask)
        if zero_shot:
            return torch.softmax(self.blip.itm_head(first).float(), dim=-1)[..., 1]
        logits = self.head(F.normalize(first.float(), dim=-1).to(first.dtype))[..., 0].float()
        return logits if self.log_scale is None else logits * self.log_scale.exp()

    def load_jax(self, config: ContextBLIPConfig, params: Mapping[str, np.ndarray]) -> None:
        """Copy the JAX model's weights (flat dotted names) into this module."""
        with torch.no_grad():
            self.load_state_dict(torch_tensors(config, params), strict=False)


def torch_tensors(
    config: ContextBLIPConfig, params: Mapping[str, np.ndarray], only: re.Pattern | None = None
) -> dict[str, torch.Tensor]:
    """The JAX parameters `params` (flat dotted names) as `TorchContextBLIP`'s state-dict entries; `only`: those
    filled from the JAX names it matches."""
    out = {f"blip.{key}": value for key, value in hf_state_dict(config.blip, params, only=only).items()}

    def linear(value: np.ndarray) -> torch.Tensor:  # (in, out) kernel -> (out, in) weight
        return torch.from_numpy(np.asarray(value, np.float32).reshape(-1, value.shape[-1]).T.copy())

    def plain(value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(value, np.float32))

    levels = len(config.adapter.resolved_levels(config.blip.vision.depth))
    own = [(f"adapter.down.{i}.weight", f"adapter.down.{i}.kernel", linear) for i in range(levels)]
    own += [("adapter.up.weight", "adapter.up.kernel", linear), ("head.weight", "head.proj.kernel", linear)]
    own += [("head.bias", "head.proj.bias", plain)]
    if config.head.logit_scale:
        own.append(("log_scale", "head.log_scale", plain))
    for key, name, convert in own:
        if only is None or only.search(name):
            out[key] = convert(params[name])
    return out


GRADIENT_FREE = re.compile(r"\.self\.key\.bias$|^head\.bias$")
"""Tensors whose true gradient is zero: a key bias adds the same to every score of a query, a head bias the same
to every candidate's logit, and softmax ignores both. Their gradients are rounding noise, which Adam scales to a
full step of either sign, so their updates cannot agree and are not compared."""


def update_difference(
    config: ContextBLIPConfig,
    before: Mapping[str, np.ndarray],
    jax_after: Mapping[str, np.ndarray],
    torch_after: Mapping[str, np.ndarray],
) -> float:
    """The worst tensor's max |torch - JAX| after one optimizer update, over the size of JAX's update of that
    tensor (`GRADIENT_FREE` ones left out): 0 for the same update, about 1 or more for another one."""
    from contextblip_jax.benchmark.jax_steps import CHECKED

    expected = {key: value.numpy() for key, value in torch_tensors(config, jax_after, CHECKED).items()}
    start = {key: value.numpy() for key, value in torch_tensors(config, before, CHECKED).items()}
    worst = 0.0
    for key, value in expected.items():
        if GRADIENT_FREE.search(key):
            continue
        moved = float(np.max(np.abs(value - start[key])))
        worst = max(worst, float(np.max(np.abs(torch_after[key] - value))) / max(moved, 1e-30))
    return worst


def torch_dtype(name: str) -> torch.dtype:
    """The torch compute dtype of the benchmark's `--dtype` (`float32` or `bfloat16`)."""
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def measured_matmul_tflops(dtype: str, size: int = 2048, runs: int = 5) -> float:
    """PyTorch's best rate of a `size`^3 matrix product on the CPU (`hardware.measured_matmul_tflops` for JAX)."""
    a = torch.ones(size, size, dtype=torch_dtype(dtype))
    return hardware.best_matmul_tflops(lambda: a @ a, size, runs)


PORTED = (("train", "finetune"), ("eval", "zeroshot"))
"""The (measure, stage) pairs this PyTorch port implements: stage 2a's train step and zero-shot scoring."""

TRAINABLE_PREFIXES = ("blip.vision_model.", "blip.text_encoder.", "adapter.", "head.", "log_scale")
"""Stage 2a's trainable parts under torch names (the JAX stage table's `blip.(vision|text)`, adapter, head)."""


@dataclasses.dataclass
class TorchModel:
    """The torch model and its optimizer, shared by the eager and the compiled side of one run: two copies of
    ViT-B's weights, gradients and Adam moments (4.5 GB each) with JAX's own and the activations passed the
    project machine's 24 GB. `optimizer` is None for scoring."""

    model: TorchContextBLIP
    optimizer: torch.optim.Optimizer | None


def build_model(setup: Any, params: Mapping[str, np.ndarray], optimizer_config: Any, device: str) -> TorchModel:
    """The torch model holding `params`, with stage 2a's trainable parameters and their Adam (train only)."""
    model = TorchContextBLIP(setup.config).to(device).eval()
    model.load_jax(setup.config, params)  # copies into the parameters already on `device`
    if not setup.train:
        return TorchModel(model, None)
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINABLE_PREFIXES))
    head = [p for n, p in named if n.startswith(("head.", "log_scale"))]
    rest = [p for n, p in named if not n.startswith(("head.", "log_scale"))]
    c = optimizer_config
    optimizer = torch.optim.Adam(
        [{"params": rest, "lr": c.lr}, {"params": head, "lr": c.head_lr}],
        betas=(c.b1, c.b2), eps=c.eps, weight_decay=c.weight_decay,
    )  # fmt: skip
    return TorchModel(model, optimizer)


def make_torch_step(
    held: TorchModel, batch: Mapping[str, torch.Tensor], dtype: torch.dtype, compile_model: bool
) -> Callable[[], torch.Tensor]:
    """A call running one train step (returning the loss before the update; with an optimizer) or one scoring
    pass (without)."""
    device = batch["images"].device.type
    forward = torch.compile(held.model) if compile_model else held.model
    autocast = dtype != torch.float32
    args = (batch["images"], batch["input_ids"], batch["attention_mask"])
    optimizer = held.optimizer
    if optimizer is None:

        @torch.no_grad()
        def score() -> torch.Tensor:
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                return forward(*args, zero_shot=True)

        return score

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            logits = forward(*args)
        loss = F.cross_entropy(logits.float(), batch["target"].long(), reduction="sum")
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def peak_memory_bytes() -> tuple[int, str] | None:
    """(bytes, what they count) from PyTorch's CUDA allocator, which JAX's `memory_stats` does not see; None on a
    CPU, where the process's peak RSS already holds every framework's memory."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated (eager and compiled sides together)"


def prepare(
    setup: Any,
    batch: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    compile_model: bool,
    shared: TorchModel | None = None,
) -> tuple[Any, TorchModel]:
    """The torch step of `setup` (a `jax_steps.Setup`) holding `params`, called once: (a `jax_steps.Prepared`,
    the model it runs). Only stage 2a (`finetune`) trains and only zero-shot scoring evaluates on this side.

    With `shared` (the model another torch side of the run returned), the step runs that model and optimizer:
    its weights go back to `params` and the optimizer forgets its moments first, so that this side's first
    output, which the benchmark compares with JAX's, starts from the same weights as every other side's."""
    from contextblip_jax.benchmark.jax_steps import CHECKED, Prepared
    from contextblip_jax.runconfig.defaults import base_config

    measure = "train" if setup.train else "eval"
    if (measure, setup.stage) not in PORTED:
        ported = " and ".join(f"--measure={m} --stage={s}" for m, s in PORTED)
        raise ValueError(f"the PyTorch side measures {ported}; got --measure={measure} --stage={setup.stage}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    began = time.perf_counter()
    if shared is None:
        held = build_model(setup, params, base_config().optimizer, device)
        logging.info("torch: model built with the JAX weights on %s in %.1f s", device, time.perf_counter() - began)
    else:
        held = shared
        held.model.load_jax(setup.config, params)
        if held.optimizer is not None:
            held.optimizer.state.clear()
    tensors = {name: torch.from_numpy(np.asarray(value)).to(device) for name, value in batch.items()}
    dtype = torch_dtype(setup.dtype)
    call = make_torch_step(held, tensors, dtype, compile_model)
    start = time.perf_counter()
    first = call().float().cpu().numpy()
    first_call_s = time.perf_counter() - start
    logging.info("torch%s: first call %.1f s", " (compiled)" if compile_model else "", first_call_s)
    updated = None
    if setup.train:  # the checked tensors after the first update, for `update_difference`
        state = held.model.state_dict()
        keys = torch_tensors(setup.config, params, CHECKED)
        updated = {key: state[key].detach().float().cpu().numpy() for key in keys}
    return Prepared(call, first_call_s if compile_model else 0.0, first, {}, updated), held
