"""Checks on a checkpoint's weight files before anything reads them, and after transformers has.

tlq reads safetensors only (never a pickle: `pytorch_model.bin` can run code when loaded). Before a
model is built, every shard's header is parsed and checked against the file (truncated, empty, random
bytes, a header whose offsets or sizes lie), so a corrupt file is one line naming it, not a traceback
from deep inside a loader. After loading, a tensor the model needs but the files lack, a stored tensor
the model has no place for, or a shape that disagrees is an error: transformers would otherwise fill
the gap with random weights and say so only in a warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tlq.errors import TlqError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_CONVERT = ("convert it once with transformers: AutoModelForImageTextToText.from_pretrained(DIR)"
            ".save_pretrained(NEW_DIR) (safe_serialization is the default)")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors shards of a checkpoint, with a one-line error when there are none or they are
    named by a broken index."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_index(index)
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise TlqError(f"{index} names {missing[0].name}, which is missing: copy the complete checkpoint")
        return files
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return [model_dir / SAFETENSORS_SINGLE]
    pickled = [name for name in _PICKLED if (model_dir / name).exists()]
    if pickled:
        raise TlqError(f"{model_dir} has only pickle weights ({pickled[0]}), which tlq never loads "
                       f"(unpickling can run code): {_CONVERT}")
    raise TlqError(f"{model_dir} has no weights (model.safetensors or {SAFETENSORS_INDEX}): "
                   f"pass a complete Hugging Face checkpoint folder")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TlqError(f"cannot read {index} ({type(exc).__name__}): restore the checkpoint's index file") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TlqError(f"{index} has no 'weight_map' of tensor name -> file: restore the checkpoint's index file")
    for name in weight_map.values():
        if Path(name).name != name:
            raise TlqError(f"{index} names the shard {name!r} outside the checkpoint folder: restore the index file")
    return weight_map


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data area, {tensor name: entry}) of one safetensors file, checked against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > min(_MAX_HEADER, size - 8):
                raise ValueError("the file is empty, truncated or not safetensors")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise TlqError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc) if "truncated" in str(exc) else "its header is not valid safetensors JSON"
        raise TlqError(f"{path} is corrupt ({reason}): restore the file from the original checkpoint") from None
    if not isinstance(header, dict):
        raise TlqError(f"{path} is corrupt (its header is not a JSON object): restore the file")
    data_size = size - 8 - length
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in entries.items():
        problem = _entry_problem(entry, data_size)
        if problem:
            raise TlqError(f"{path} is corrupt (tensor {name!r}: {problem}): restore the file from the original checkpoint")
    return 8 + length, entries


def _entry_problem(entry, data_size: int) -> str | None:
    if not isinstance(entry, dict):
        return "entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        return f"unknown dtype {dtype!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return "shape is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return "data_offsets is not [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return f"its bytes [{begin}, {end}) lie outside the file's {data_size} data bytes (truncated?)"
    if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        return f"{end - begin} bytes for shape {shape} of {dtype}"
    return None


def check_weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Parse every shard's header; returns {tensor name: file}. Raises TlqError on any corrupt shard."""
    names: dict[str, Path] = {}
    for path in weight_files(model_dir):
        _, entries = read_header(path)
        names.update({name: path for name in entries})
    if not names:
        raise TlqError(f"{model_dir} holds no tensors: pass a complete checkpoint")
    return names


def check_loading_info(model_dir: str | Path, info: dict, ignore_unexpected: tuple[str, ...] = ()) -> None:
    """Refuse a checkpoint that did not fill the model exactly (transformers' `output_loading_info`)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not k.startswith(ignore_unexpected))
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key = mismatched[0][0] if isinstance(mismatched[0], (tuple, list)) else mismatched[0]
        raise TlqError(f"{model_dir}: tensor {key} has the wrong shape for the model config.json describes "
                       f"({len(mismatched)} such tensors): restore the checkpoint or its config.json")
    if missing:
        raise TlqError(f"{model_dir}: the weights lack {missing[0]} ({len(missing)} tensors missing) that "
                       f"config.json's model needs: restore the complete checkpoint (a missing shard?)")
    if unexpected:
        raise TlqError(f"{model_dir}: the weights hold {unexpected[0]} ({len(unexpected)} tensors) that "
                       f"config.json's model has no place for: config.json and the weights disagree")


# The largest magnitude a served weight can have: float16's maximum. A stored value beyond it (3e38 in a
# float32 file, say) cannot run in the half-precision kernels models are served with, and as a
# quantization scale it zeroes every other weight of its group: a corrupt file, not a model.
MAX_WEIGHT_MAGNITUDE = 65504.0


def weight_problem(tensor) -> str | None:
    """Why a stored floating tensor cannot be a real weight (NaN, inf, beyond float16), or None."""
    import torch

    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return None
    if not torch.isfinite(tensor.detach()).all():
        return "holds NaN or inf"
    peak = float(tensor.detach().abs().max())
    if peak > MAX_WEIGHT_MAGNITUDE:
        return f"holds {peak:.3g}, beyond float16's range ({MAX_WEIGHT_MAGNITUDE:g})"
    return None


def check_finite_parameters(model, model_dir: str | Path) -> None:
    """NaN, inf or an impossible magnitude in a stored weight makes every method produce garbage:
    refuse it up front."""
    for name, tensor in model.named_parameters():
        problem = weight_problem(tensor)
        if problem:
            raise TlqError(f"{model_dir}: weight {name} {problem}: the checkpoint is corrupt; restore it")
