"""Write a calibrated model as a compressed-tensors checkpoint that vLLM and transformers load.

The compressed-tensors package does the formats: its config classes describe the scheme, its
compressors pack the integers. tlq only hands it the grids its algorithms chose: every fake-quantized
weight already lies on its grid, so packing reproduces exactly the weights tlq calibrated with.
Weight-only schemes are stored `pack-quantized`, W8A8/W4A8 `int-quantized` (int8 weights, dynamic
per-token int8 activations). Every Linear outside the decoder layers is listed in `ignore`.

The output appears atomically: everything is written to a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlq.errors import TlqError
from tlq.models import ModelAdapter
from tlq.quant import QuantizedWeight
from tlq.recipe import Scheme

RECIPE_FILE = "tlq_recipe.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_NOT_COPIED = {"config.json", RECIPE_FILE}


def quantization_config(model: nn.Module, adapter: ModelAdapter, scheme: Scheme):
    """The compressed-tensors QuantizationConfig for `scheme`, ignoring every non-decoder Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    quantized = set(adapter.quantized_linear_names(model))
    ignore = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in quantized]
    weights = QuantizationArgs(
        num_bits=scheme.weight_bits, type="int", symmetric=scheme.symmetric,
        strategy="channel" if scheme.group_size is None else "group",
        group_size=scheme.group_size, observer="minmax",
    )
    activations = None
    if scheme.quantizes_activations:
        activations = QuantizationArgs(num_bits=scheme.act_bits, type="int", symmetric=True, strategy="token",
                                       dynamic=True, observer=None)
    fmt = "int-quantized" if scheme.quantizes_activations else "pack-quantized"
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    return QuantizationConfig(config_groups={"group_0": group}, ignore=ignore, format=fmt,
                              quantization_status="frozen")


def check_exportable(model: nn.Module, adapter: ModelAdapter, scheme: Scheme) -> None:
    # compressed-tensors stores one group size per scheme: a Linear narrower than the group cannot be
    # stored with it, so refuse before calibrating rather than after.
    if scheme.group_size is None:
        return
    for name in adapter.quantized_linear_names(model):
        columns = model.get_submodule(name).in_features
        if columns % scheme.group_size:
            raise TlqError(
                f"{name} has {columns} inputs, not a multiple of group size {scheme.group_size}: "
                f"choose a group size that divides it (e.g. --group-size {_largest_pow2_divisor(columns)})"
            )


def _largest_pow2_divisor(n: int) -> int:
    return min(n & -n, 128)


def _copy_side_files(source_dir: Path, target_dir: Path) -> None:
    """Tokenizer, processor, chat template and generation files travel with the weights."""
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.name.endswith(".index.json"):
            continue
        if not (target_dir / path.name).exists():
            shutil.copy2(path, target_dir / path.name)


def export_compressed(model: nn.Module, adapter: ModelAdapter, scheme: Scheme, quantized: dict[str, QuantizedWeight],
                      out_dir: str | Path, source_dir: str | Path | None = None,
                      recipe_record: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save `model` (whose decoder Linears hold fake-quantized weights) as a compressed checkpoint.

    The model is compressed in place and should not be used for inference afterwards.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TlqError(f"output {out_dir} already exists: remove it or pass --overwrite")
    missing = [n for n in adapter.quantized_linear_names(model) if n not in quantized]
    if missing:
        raise ValueError(f"{len(missing)} decoder Linears were not calibrated, e.g. {missing[0]}")
    check_exportable(model, adapter, scheme)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        config = quantization_config(model, adapter, scheme)
        apply_quantization_config(model, config, show_progress=False)
        with torch.no_grad():
            for name, q in quantized.items():
                module = model.get_submodule(name)
                module.weight.data.copy_(q.weight.to(module.weight.dtype))
                module.weight_scale.data.copy_(q.scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    zero = q.zero_point.reshape(module.weight_zero_point.shape)
                    module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=config.format)
        # compressed-tensors writes `ignore` in checkpoint key names (what vLLM matches, e.g. Qwen2-VL's
        # "visual.*"), while transformers 5 matches loaded module names ("model.visual.*"): list both.
        compressor.quantization_config.ignore = sorted(set(compressor.quantization_config.ignore) | set(config.ignore))
        compressor.compress_model(model)
        model.save_pretrained(staging)
        compressor.update_config(str(staging))
        if source_dir is not None:
            _copy_side_files(Path(source_dir), staging)
        if recipe_record is not None:
            (staging / RECIPE_FILE).write_text(json.dumps(recipe_record, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, trash / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
