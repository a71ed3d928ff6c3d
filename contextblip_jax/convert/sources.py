"""Reading a PyTorch checkpoint into numpy, whatever form it comes in.

Supported: a Hugging Face folder (`config.json` + `model.safetensors` / `pytorch_model.bin`, sharded or not),
a lone `.safetensors` or `.bin` file, and pickled `.pth`/`.pt` files (original salesforce/BLIP
`{"model": state_dict}` or a bare state dict). Pickles are read with `torch.load(weights_only=True)` only, so a
file that needs code execution is refused; torch is imported only for pickles.

Every file may be hostile or damaged: whatever it holds, reading it either succeeds or raises a ConversionError
naming it (tests/convert/test_hostile_files.py fuzzes each reader).

Imports: its own package (`convert`), `data`.
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
from contextblip_jax.data.imagecode import is_plain_name

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
    hf_config = _read_hf_config(config_path) if os.path.exists(config_path) else None
    has_tokenizer = any(f in files for f in TOKENIZER_FILES)
    return RawCheckpoint(path, "huggingface", tensors, hf_config, path if has_tokenizer else None)


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ConversionError(index_path, ["weight_map must be a JSON object of tensor name -> shard file name"])
    shards = sorted(set(weight_map.values()))
    # Hugging Face writes plain file names: `../x`, `/etc/x` or `a/b` would read files outside the checkpoint.
    outside = [shard for shard in shards if not shard or not is_plain_name(shard)]
    if outside:
        raise ConversionError(
            index_path, [f"shard {shard!r} is not a file name in the index's folder" for shard in outside]
        )
    folder = os.path.dirname(index_path)
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise ConversionError(index_path, [f"shard {shard} named in the index does not exist"])
        read = _read_safetensors if shard.endswith(".safetensors") else _read_pickle
        tensors.update(read(shard_path))
    return tensors


def _check_regular_file(path: str) -> None:
    """A FIFO or device where a checkpoint file should be would block the readers or feed them forever."""
    if not os.path.isfile(path):
        raise ConversionError(path, ["not a regular file"])


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    _check_regular_file(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(path, [f"not a readable safetensors file ({error})"]) from error
    except AttributeError as error:  # an F8/F4 tensor: safetensors looks up a numpy dtype that does not exist
        raise ConversionError(path, [f"holds a tensor dtype numpy has no type for ({error})"]) from error


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ConversionError(
            path, ["reading a PyTorch pickle needs torch: pip install -e '.[dev]' (or pip install torch)"]
        ) from error
    _check_regular_file(path)
    obj = _torch_load(torch, path)
    for wrapper in ("model", "model_state_dict", "state_dict"):  # salesforce/BLIP, ContextBLIP authors, others
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ConversionError(path, [f"pickle holds a {type(obj).__name__}, not a state dict"])
    bad = [f"entry {k!r} is not a tensor" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    bad += [f"key {k!r} is not a string" for k in obj if not isinstance(k, str)]
    if bad:
        raise ConversionError(path, bad)
    arrays = {}
    for key, tensor in obj.items():
        try:
            arrays[key] = _to_numpy(torch, tensor)
        except (TypeError, RuntimeError, NotImplementedError) as error:  # meta, sparse, quantized or float8
            raise ConversionError(path, [f"entry {key!r} has no numpy form ({error})"]) from error
    return arrays


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
    except Exception as error:
        # torch.load of damaged bytes fails with whatever the damage reaches: RuntimeError, EOFError, BadZipFile,
        # but also IndexError, KeyError, struct.error and AssertionError from inside its unpickler (fuzzed in
        # tests/convert/test_hostile_files.py). All of them mean the same: this file is not a checkpoint.
        raise ConversionError(
            path, [f"not a readable PyTorch checkpoint (truncated or corrupt?): {type(error).__name__}: {error}"]
        ) from error


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
    return _read_hf_config(config_path) if os.path.exists(config_path) else None


def _read_hf_config(path: str) -> dict[str, Any]:
    """A Hugging Face `config.json`, with the sections `infer.config_from_hf` reads as objects (or null)."""
    hf = _read_json(path)
    wrong = [key for key in ("vision_config", "text_config") if not isinstance(hf.get(key), dict | None)]
    if wrong:
        raise ConversionError(path, [f"{key} must be a JSON object" for key in wrong])
    return hf


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`. Invalid UTF-8 (a ValueError, as JSONDecodeError) and nesting deeper than the
    interpreter's recursion limit (RecursionError) are refused like any other damage."""
    _check_regular_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as error:
        raise ConversionError(path, [f"not valid JSON: {error}"]) from error
    if not isinstance(data, dict):
        raise ConversionError(path, [f"holds a JSON {type(data).__name__}, not an object"])
    return data
