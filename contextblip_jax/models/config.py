"""Architecture configs for the BLIP towers.

They are plain frozen dataclasses so that a converted checkpoint can carry its architecture as JSON and a
model can be rebuilt from that JSON alone, with no PyTorch and no Hugging Face config classes.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "quick_gelu")
"""Activation names the towers accept; `gelu` is the exact (erf) GELU both BLIP sources use."""
INITS = ("bert", "fan_in", "torch")
"""Initialisations a ContextBLIP config may name (`ContextBLIPConfig.init`, which says what each draws)."""
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """BLIP ViT: pre-LN blocks, no pre-LayerNorm, a final LayerNorm."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1

    def validate(self) -> None:
        _check_positive(
            "vision", self, ("width", "depth", "num_heads", "mlp_dim", "image_size", "patch_size", "layer_norm_eps")
        )
        _check_heads("vision", self.width, self.num_heads)
        _check_activation("vision", self.activation)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}"
            )


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """BLIP's BERT encoder: post-LN layers, each with optional cross-attention to image tokens."""

    vocab_size: int = 30524
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 512
    encoder_width: int = 768
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"

    def validate(self) -> None:
        _check_positive(
            "text",
            self,
            (
                "vocab_size",
                "width",
                "depth",
                "num_heads",
                "mlp_dim",
                "max_positions",
                "encoder_width",
                "layer_norm_eps",
            ),
        )
        _check_heads("text", self.width, self.num_heads)
        _check_activation("text", self.activation)


@dataclasses.dataclass(frozen=True)
class BlipConfig:
    """A BLIP retrieval model: both towers, the ITC projections (to `embed_dim`) and the ITM head."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 256

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        _check_positive("", self, ("embed_dim",))
        if self.text.encoder_width != self.vision.width:
            raise ValueError(
                f"text.encoder_width {self.text.encoder_width} must equal vision.width {self.vision.width}: "
                "the text tower cross-attends to the vision tower's tokens"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlipConfig:
        """Builds a config from a (possibly partial) dict; unknown keys and mistyped values are an error naming
        each of them (`_parse_config`)."""
        return _parse_config(cls, data)

    @classmethod
    def from_json(cls, text: str) -> BlipConfig:
        return cls.from_dict(json.loads(text))

    def override(self, changes: dict[str, Any]) -> BlipConfig:
        """Returns this config with the (nested, partial) `changes` applied."""
        return BlipConfig.from_dict(deep_merge(self.to_dict(), changes))


def flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"vision.width": 768, ...}`: a nested config dict as dotted keys, for messages that name fields."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied recursively (a partial nested dict overrides only what it names)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_partial(value: str) -> dict[str, Any]:
    """A partial model config (as `--model-config` takes it): inline JSON, or the path of a JSON file, holding an
    object. Its fields are checked when it is applied (`override`). An unreadable or non-UTF-8 file, invalid JSON,
    JSON nested past the interpreter's recursion limit (json raises RecursionError) and a non-object are ValueErrors.
    """
    text = value
    try:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                text = f.read()
        data = json.loads(text)
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"not readable JSON ({type(error).__name__}: {error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"must be a JSON object, got {reprlib.repr(data)}")
    return data


def _parse_config(cls: type[T], data: Any) -> T:
    """The config dataclass `cls` from JSON-like, possibly partial `data` (omitted fields keep their defaults).

    A model config comes from files and `--model-config`, so anything may stand where a number is expected: each
    unknown key and each value of the wrong type is named by its dotted path in one ValueError, before any of them
    can reach a model (where a string width or a nested object fails far from its cause, and NaN silently)."""
    problems: list[str] = []
    config = _parse_fields(cls, data, "", problems)
    if problems:
        raise ValueError("; ".join(problems))
    return config


_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _parse_fields(cls: type[T], data: Any, prefix: str, problems: list[str]) -> T:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'the model config'} must be a JSON object, got {reprlib.repr(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        hint = hints.get(key)
        if hint is None:
            problems.append(f"unknown model config key {name}")
        elif dataclasses.is_dataclass(hint):
            values[key] = _parse_fields(hint, value, f"{name}.", problems)
        elif typing.get_origin(hint) is tuple:  # tuple[int, ...]: JSON has lists
            if isinstance(value, list | tuple) and all(_is_int(item) for item in value):
                values[key] = tuple(value)
            else:
                problems.append(f"{name} must be a list of integers, got {reprlib.repr(value)}")
        elif _has_type(value, hint):
            values[key] = value
        else:
            problems.append(f"{name} must be {_EXPECTED[hint]}, got {reprlib.repr(value)}")
    return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_type(value: Any, hint: type) -> bool:
    if hint is int:
        return _is_int(value)
    if hint is float:  # an integer is a number too; JSON's NaN and Infinity are not model settings
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    return isinstance(value, hint)


def _check_positive(section: str, config: Any, fields: Sequence[str]) -> None:
    """Sizes, counts and epsilons must be > 0: a zero patch size divides by zero, a negative width builds arrays
    of negative size."""
    prefix = f"{section}." if section else ""
    bad = [f"{prefix}{field} {getattr(config, field)}" for field in fields if not getattr(config, field) > 0]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be positive")


def _check_heads(tower: str, width: int, num_heads: int) -> None:
    if num_heads <= 0 or width % num_heads:
        raise ValueError(f"{tower}.width {width} is not divisible by {tower}.num_heads {num_heads}")


def _check_activation(tower: str, name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"{tower}.activation {name!r} is not one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """ContextBLIP's multi-level adapter (the authors' `models/multiscale_adapter.py`): ViT blocks `levels`
    (1-indexed), width / `reduction` per level. `conv_kernels` switches on the optional depthwise-convolution
    branch (off: the authors' design).

    Empty `levels` means four levels spread evenly over the ViT: 3/6/9/12 for ViT-B, 6/12/18/24 for ViT-L.
    `enabled=False` is the ablation without the adapter: its residual is never added, so the ViT's tokens go on
    unchanged; its weights stay in the model, unused, so checkpoints keep one layout and a seed draws every other
    weight as it does with the adapter on (a paired comparison).
    """

    levels: tuple[int, ...] = ()
    reduction: int = 2
    conv_kernels: tuple[int, ...] = ()
    enabled: bool = True

    def resolved_levels(self, depth: int, count: int = 4) -> tuple[int, ...]:
        if self.levels:
            return tuple(self.levels)
        return tuple(sorted({max(1, depth * (i + 1) // count) for i in range(count)}))


@dataclasses.dataclass(frozen=True)
class TMIMConfig:
    """Text-guided masked image modelling (the authors' `models/multiscale_adapter.py`)."""

    mask_rate: float = 0.25
    random_mask: bool = False
    noise: float = 0.02
    decoder_depth: int = 4
    decoder_heads: int = 8
    decoder_mlp_dim: int = 3072
    text_adapter_reduction: int = 2
    mask_prediction: bool = False
    """Adds the optional mask-prediction head `σ(W f + b)` (its loss weight is a training setting)."""


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """The inter-context encoder over the candidates of one description (stage 2b, the authors'
    `finetune_context.py`)."""

    num_candidates: int = 10
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 3072
    dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The scoring head of stages 2a and 2b: `Linear(width -> 1)` on the L2-normalised ITM first token."""

    logit_scale: float = 0.0
    """0: the authors' head. s > 0: the logits are multiplied by a learned `exp(t)`, `t` starting at `log(s)`
    (CLIP's learnable temperature). A head reading unit vectors through N(0, 0.02) weights starts with logits
    that barely differ between 10 near-identical candidates; trained from scratch, the candidates' features then
    collapse onto one another before they learn anything (see configs/synthetic.py). Checkpoints hold no scale:
    converting one with s > 0 starts the scale fresh at s."""


@dataclasses.dataclass(frozen=True)
class ContextBLIPConfig:
    """BLIP's towers plus the parts ContextBLIP adds: adapter, TMIM decoder (and the optional mask head), scoring
    head, inter-context encoder.

    `init` says how parameters are drawn. Converted weights replace whatever was drawn, so it matters only for the
    parts a checkpoint lacks (all but BLIP when stage 1 starts from a BLIP checkpoint).
    - `bert`: every dense and convolution kernel and every table (positions, mask token) N(0, 0.02), biases zero:
      BLIP's initialisation (BERT's `_init_weights`).
    - `fan_in`: every dense and convolution kernel of the whole model, BLIP's towers included, U(±1/sqrt(fan_in)),
      biases zero (`layers.redraw_fan_in`): for models trained from scratch at small widths.
    - `torch`: BLIP's towers as `bert`; the parts the authors create fresh as their code creates them, with
      PyTorch's defaults (`layers.redraw_torch`). `nn.Linear` (and `nn.Conv2d`) kernels and biases
      U(±1/sqrt(fan_in)): the adapter, TMIM's text adapter and pixel head, the mask head, the scoring head and the
      inter-context encoder's layers (plain `nn.Linear`s and LayerNorms, not a BERT model). N(0, 1): TMIM's mask
      token (`torch.randn`), its decoder positions and the inter-context positions (`nn.Embedding`). TMIM's decoder
      layers stay N(0, 0.02): the authors build them as a BERT model, whose `_init_weights` draws that.
    At N(0, 1) an inter-context position row has norm ≈ sqrt(width) (≈ 28 at 768) against the unit-norm candidate
    features it is added to (video sets), so positions dominate the encoder's input; at N(0, 0.02) ≈ 0.55.
    """

    blip: BlipConfig = dataclasses.field(default_factory=BlipConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    tmim: TMIMConfig = dataclasses.field(default_factory=TMIMConfig)
    context: ContextConfig = dataclasses.field(default_factory=ContextConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    cls_token_id: int = 101
    """`[CLS]`: the ITC pass uses it where the ITM pass has `[ENC]` (hard-negative similarities)."""
    init: str = "bert"
    """How fresh parameters are drawn: `bert`, `fan_in` or `torch` (see the class docstring)."""

    def validate(self) -> None:
        self.blip.validate()
        _check_positive("adapter", self.adapter, ("reduction",))
        _check_positive(
            "tmim", self.tmim, ("decoder_depth", "decoder_heads", "decoder_mlp_dim", "text_adapter_reduction")
        )
        _check_positive("context", self.context, ("num_candidates", "depth", "num_heads", "mlp_dim"))
        depth = self.blip.vision.depth
        levels = self.adapter.resolved_levels(depth)
        if any(not 1 <= level <= depth for level in levels):
            raise ValueError(f"adapter.levels {levels} must be ViT blocks between 1 and {depth}")
        if self.blip.vision.width % self.adapter.reduction:
            raise ValueError(f"vision.width {self.blip.vision.width} is not divisible by adapter.reduction")
        if any(k <= 0 or k % 2 == 0 for k in self.adapter.conv_kernels):
            raise ValueError(f"adapter.conv_kernels {self.adapter.conv_kernels} must be positive and odd")
        if not 0 < self.tmim.mask_rate < 1:
            raise ValueError(f"tmim.mask_rate {self.tmim.mask_rate} must lie strictly between 0 and 1")
        if self.tmim.noise < 0:
            raise ValueError(f"tmim.noise {self.tmim.noise} must not be negative")
        if not 0 <= self.context.dropout < 1:
            raise ValueError(f"context.dropout {self.context.dropout} must lie in [0, 1)")
        if self.cls_token_id < 0:
            raise ValueError(f"cls_token_id {self.cls_token_id} must not be negative")
        _check_heads("tmim decoder", self.blip.vision.width, self.tmim.decoder_heads)
        _check_heads("context", self.blip.text.width, self.context.num_heads)
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not one of {INITS}")
        if self.head.logit_scale < 0:
            raise ValueError(f"head.logit_scale {self.head.logit_scale} must be 0 (no scale) or positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def override(self, changes: dict[str, Any]) -> ContextBLIPConfig:
        """Returns this config with the (nested, partial) `changes` applied."""
        return ContextBLIPConfig.from_dict(deep_merge(self.to_dict(), changes))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextBLIPConfig:
        """As `BlipConfig.from_dict`; lists (JSON's tuples) become tuples."""
        return _parse_config(cls, data)

    @classmethod
    def from_json(cls, text: str) -> ContextBLIPConfig:
        return cls.from_dict(json.loads(text))
