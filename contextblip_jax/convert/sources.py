"""Reading a PyTorch checkpoint into numpy, whatever form it comes in.

Supported: a Hugging Face folder (`config.json` + `model.safetensors` / `pytorch_model.bin`, sharded or not),
a lone `.safetensors` or `.bin` file, and pickled `.pth`/`.pt` files (original salesforce/BLIP
`{"model": state_dict}` or a bare state dict). Pickles are read with `torch.load(weights_only=True)` only, so a
file that needs code execution is refused; torch is imported only for pickles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from contextblip_jax.convert.errors import ConversionError

SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class RawCheckpoint:
    """Tensors by their names in the file, plus what the source says about itself."""

    path: str
    format: str
    tensors: dict[str, np.ndarray]
    hf_config: dict[str, Any] | None = None
    tokenizer_dir: str | None = None


def read_checkpoint(path: str) -> RawCheckpoint:
    if not os.path.exists(path):
        raise ConversionError(path, ["no such file or folder"])
    if os.path.isdir(path):
        return _read_folder(path)
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return RawCheckpoint(path, "safetensors", _read_safetensors(path), _config_beside(path))
    if lower.endswith((".bin", ".pth", ".pt")):
        fmt = "bin" if lower.endswith(".bin") else "pth"
        return RawCheckpoint(path, fmt, _read_pickle(path), _config_beside(path) if fmt == "bin" else None)
    raise ConversionError(path, ["unknown checkpoint format: expected a folder, .safetensors, .bin, .pth or .pt"])


def _read_folder(path: str) -> RawCheckpoint:
    config_path = os.path.join(path, "config.json")
    files = set(os.listdir(path))
    weights = [name for name in SAFETENSORS_NAMES + PICKLE_NAMES if name in files]
    if not weights:
        expected = ", ".join(SAFETENSORS_NAMES + PICKLE_NAMES)
        raise ConversionError(path, [f"folder holds no weights file (looked for {expected})"])
    name = weights[0]
    weights_path = os.path.join(path, name)
    if name.endswith(".index.json"):
        tensors = _read_sharded(weights_path)
    elif name.endswith(".safetensors"):
        tensors = _read_safetensors(weights_path)
    else:
        tensors = _read_pickle(weights_path)
    hf_config = _read_json(config_path) if os.path.exists(config_path) else None
    has_tokenizer = any(f in files for f in TOKENIZER_FILES)
    return RawCheckpoint(path, "huggingface", tensors, hf_config, path if has_tokenizer else None)


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    index = _read_json(index_path)
    folder = os.path.dirname(index_path)
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise ConversionError(index_path, [f"shard {shard} named in the index does not exist"])
        read = _read_safetensors if shard.endswith(".safetensors") else _read_pickle
        tensors.update(read(shard_path))
    return tensors


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(path, [f"not a readable safetensors file ({error})"]) from error


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ConversionError(
            path, ["reading a PyTorch pickle needs torch: pip install -r requirements-dev.txt"]
        ) from error
    obj = _torch_load(torch, path)
    for wrapper in ("model", "model_state_dict", "state_dict"):  # salesforce/BLIP, ContextBLIP authors, others
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ConversionError(path, [f"pickle holds a {type(obj).__name__}, not a state dict"])
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(path, [f"entry {k!r} is not a tensor" for k in bad])
    return {k: _to_numpy(torch, v) for k, v in obj.items()}


def _torch_load(torch: Any, path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "global" in reason.lower():
            raise ConversionError(
                path, [f"refusing to load: the pickle needs code execution, which weights_only=True forbids ({reason})"]
            ) from error
        raise ConversionError(path, [f"not a readable PyTorch checkpoint ({reason})"]) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(path, [f"not a readable PyTorch checkpoint (truncated or corrupt?): {error}"]) from error


def _unpickler_reason(message: str) -> str:
    """The one informative line of torch's long weights_only error."""
    _, _, detail = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail or message).splitlines() if line.strip()]
    return lines[0] if lines else message


def _is_zip(path: str) -> bool:
    """Only the zip-based torch format can be memory-mapped, which keeps conversion's peak memory low."""
    return zipfile.is_zipfile(path)


def _to_numpy(torch: Any, tensor: Any) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def _config_beside(path: str) -> dict[str, Any] | None:
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    return _read_json(config_path) if os.path.exists(config_path) else None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(path, [f"not valid JSON: {error}"]) from error
