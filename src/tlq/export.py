"""Write a calibrated model as a compressed-tensors checkpoint that vLLM and transformers load.

The compressed-tensors package does the formats: its config classes describe the scheme, its
compressors pack the integers. tlq only hands it the grids its algorithms chose: every fake-quantized
weight already lies on its grid, so packing reproduces exactly the weights tlq calibrated with.
Weight-only schemes are stored `pack-quantized`, W8A8/W4A8 `int-quantized` (int8 weights, dynamic
per-token int8 activations). Every Linear outside the decoder layers is listed in `ignore`.

`export_compressed` saves a model held in memory. `export_streamed` writes the same format without it
(lazy calibration): tensors outside the decoder are copied from the source shards verbatim, and each
calibrated decoder layer (read back from the work directory) is compressed on its own and written as
its own shard, so host memory holds one layer.

The output appears atomically: everything is written to a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlq import faults
from tlq.errors import TlqError
from tlq.guards import follow_umask, write_error
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


def check_exportable(model: nn.Module, adapter: ModelAdapter, scheme: Scheme, layer: nn.Module | None = None) -> None:
    # compressed-tensors stores one group size per scheme: a Linear narrower than the group cannot be
    # stored with it, so refuse before calibrating rather than after. Every decoder layer has the shapes
    # of `layer` (default: the first).
    if scheme.group_size is None:
        return
    layer = layer if layer is not None else adapter.layers(model)[0]
    for name in adapter.linear_names:
        columns = layer.get_submodule(name).in_features
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


def _checkpoint_names(module_names: list[str], checkpoint_keys: set[str]) -> list[str]:
    """The checkpoint key (without '.weight') of each module: drop leading parts until the key exists
    ('model.visual.blocks.0.attn.qkv' is stored as 'visual.blocks.0.attn.qkv')."""
    names = []
    for name in module_names:
        parts = name.split(".")
        for start in range(len(parts)):
            if ".".join(parts[start:]) + ".weight" in checkpoint_keys:
                names.append(".".join(parts[start:]))
                break
    return names


@contextmanager
def staged_output(out_dir: Path, overwrite: bool, source_dir: str | Path | None, recipe_record: dict[str, Any] | None,
            retire: tuple[Path, ...] = ()):
    """Yield a temporary sibling of `out_dir` to write into; on success add the side files and the recipe
    and rename it into place, on any error remove it. A write that fails (disk full, read-only) is one
    line; the folder gets the permissions the umask gives, like any folder the user makes.

    `retire` (the run's work folder) and a replaced output are renamed into one `.OUT.old-*` sibling
    just before the final rename and removed after it, so a kill at any point leaves either the old
    state or the new output, plus at most that sibling, which the next run on OUT removes.
    """
    if out_dir.exists() and not overwrite:
        raise TlqError(f"output {out_dir} already exists: remove it or pass --overwrite")
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        yield staging
        if source_dir is not None:
            _copy_side_files(Path(source_dir), staging)
        if recipe_record is not None:
            (staging / RECIPE_FILE).write_text(json.dumps(recipe_record, indent=2, sort_keys=True) + "\n")
        follow_umask(staging)
        faults.reached("export-staged")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        for path in (*retire, out_dir):
            if path.exists():
                os.replace(path, trash / path.name)
        os.replace(staging, out_dir)
        staging = None
        faults.reached("export-renamed")
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = write_error(exc)
        if reason is not None:
            raise TlqError(f"cannot write {out_dir}: {reason}") from None
        raise


@torch.no_grad()
def _set_grid(module: nn.Module, q: QuantizedWeight) -> None:
    """Copy a calibrated grid into the parameters compressed-tensors attached to `module`."""
    module.weight_scale.data.copy_(q.scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
        zero = q.zero_point.reshape(module.weight_zero_point.shape)
        module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))


def export_streamed(skeleton: nn.Module, adapter: ModelAdapter, scheme: Scheme, layers, layer_state,
                    out_dir: str | Path, source_dir: str | Path, recipe_record: dict[str, Any] | None = None,
                    overwrite: bool = False, retire: tuple[Path, ...] = ()) -> Path:
    """Write the compressed checkpoint one decoder layer at a time.

    skeleton: the model without decoder layers (lazy loading); layers: its tlq.models.lazy.LazyLayers;
    layer_state(i) -> (the calibrated layer's state dict, {Linear name in the layer: QuantizedWeight}).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from safetensors.torch import save_file

    from tlq.models.lazy import CheckpointTensors

    tensors = CheckpointTensors(source_dir)
    prefix = tensors.layer_prefix()
    config = quantization_config(skeleton, adapter, scheme)
    config.ignore = sorted(set(config.ignore) | set(_checkpoint_names(config.ignore, set(tensors.keys()))))
    with staged_output(Path(out_dir), overwrite, source_dir, recipe_record, retire) as staging:
        weight_map: dict[str, str] = {}
        total = 0

        def write(shard: dict[str, torch.Tensor], name: str) -> None:
            nonlocal total
            save_file({k: v.contiguous() for k, v in shard.items()}, str(staging / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            total += sum(v.numel() * v.element_size() for v in shard.values())

        write(tensors.get_many([k for k in tensors.keys() if not k.startswith(prefix)]), "model-outside-decoder.safetensors")
        for index in range(len(layers)):
            layer = layers.empty_layer(index)
            state, grids = layer_state(index)
            layer.load_state_dict(state)
            layer_config = QuantizationConfig(config_groups=config.config_groups, ignore=[], format=config.format,
                                              quantization_status="frozen")
            apply_quantization_config(layer, layer_config, show_progress=False)
            for name, q in grids.items():
                _set_grid(layer.get_submodule(name), q)
            ModelCompressor.from_pretrained_model(layer, quantization_format=config.format).compress_model(layer)
            write({f"{prefix}{index}.{k}": v for k, v in layer.state_dict().items()},
                  f"model-decoder-{index:05d}.safetensors")
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        shutil.copy2(Path(source_dir) / "config.json", staging / "config.json")
        config.quantization_status = QuantizationStatus.COMPRESSED
        ModelCompressor(quantization_config=config).update_config(str(staging))
    return Path(out_dir)


def export_compressed(model: nn.Module, adapter: ModelAdapter, scheme: Scheme, quantized: dict[str, QuantizedWeight],
                      out_dir: str | Path, source_dir: str | Path | None = None,
                      recipe_record: dict[str, Any] | None = None, overwrite: bool = False,
                      retire: tuple[Path, ...] = ()) -> Path:
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
    with staged_output(out_dir, overwrite, source_dir, recipe_record, retire) as staging:
        config = quantization_config(model, adapter, scheme)
        apply_quantization_config(model, config, show_progress=False)
        for name, q in quantized.items():
            module = model.get_submodule(name)
            module.weight.data.copy_(q.weight.to(module.weight.dtype))
            _set_grid(module, q)
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=config.format)
        # compressed-tensors writes `ignore` in checkpoint key names (what vLLM matches, e.g. Qwen2-VL's
        # "visual.*"), while transformers 5 matches loaded module names ("model.visual.*"): list both.
        compressor.quantization_config.ignore = sorted(set(compressor.quantization_config.ignore) | set(config.ignore))
        compressor.compress_model(model)
        model.save_pretrained(staging)
        compressor.update_config(str(staging))
    return out_dir
