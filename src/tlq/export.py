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

import gc
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlq import faults
from tlq.errors import TlqError
from tlq.guards import follow_umask, write_error
from tlq.measure import return_freed_memory
from tlq.models import ModelAdapter
from tlq.models.processing import complete_processor_config
from tlq.quant import QuantizedWeight
from tlq.recipe import Scheme

RECIPE_FILE = "tlq_recipe.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_NOT_COPIED = {"config.json", RECIPE_FILE}


def quantization_config(scheme: Scheme, ignore: list[str]):
    """The compressed-tensors QuantizationConfig for `scheme`, leaving the `ignore` entries unquantized."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

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
    """Tokenizer, processor (completed: tlq.models.processing), chat template and generation files travel
    with the weights."""
    for path in sorted(source_dir.iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.name.endswith(".index.json"):
            continue
        if (target_dir / path.name).exists():
            continue
        if path.name == "processor_config.json":
            config = complete_processor_config(json.loads(path.read_text()))
            (target_dir / path.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(path, target_dir / path.name)


def ignore_entries(model: nn.Module, adapter: ModelAdapter, checkpoint_keys: set[str]) -> list[str]:
    """Every Linear outside the decoder layers, three ways, so no loader can quantize it:
    - its module name (what transformers matches, e.g. `model.visual.blocks.0.attn.qkv`);
    - its checkpoint name (what vLLM maps into its own names, e.g. `visual.blocks.0.attn.qkv`);
    - `re:` entries for each non-decoder subtree (`re:(.*\\.)?visual\\..*`), which also cover names a loader
      makes up: vLLM fuses q/k/v into `qkv_proj`, and a fused layer is ignored only when every part is.
    Modules inside the decoder layers that stay FP but that engines build as Linears (an MoE router,
    `adapter.kept_fp`) are listed by name and by a `re:` entry for their last names.
    """
    decoder = adapter.decoder_layers + "."
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(decoder)]
    kept = [f"{decoder}{i}.{name}" for i in range(len(adapter.layers(model))) for name in adapter.kept_fp]
    stored = _stored_names(names + kept, checkpoint_keys)
    subtrees = {_subtree_root(n, adapter.decoder_layers) for n in names} - set(names)  # lm_head is a leaf
    patterns = [f"re:(.*\\.)?{re.escape(root.split('.')[-1])}\\..*" for root in sorted(subtrees)]
    patterns += [f"re:.*\\.{re.escape(name)}$" for name in adapter.kept_fp]
    return sorted(set(names) | set(kept) | set(stored)) + patterns


def _subtree_root(name: str, decoder_path: str) -> str:
    """The outermost module on `name`'s path that is not on the way to the decoder layers
    ('model.visual.blocks.0.attn.qkv' -> 'model.visual'; 'lm_head' -> 'lm_head')."""
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if not (decoder_path == prefix or decoder_path.startswith(prefix + ".")):
            return prefix
    return name


def _stored_names(names: list[str], checkpoint_keys: set[str]) -> list[str]:
    """The checkpoint name (without '.weight') each module's weight is stored under: the stored weight of
    whose dotted name shares the longest tail with the module's ('model.vision_tower.encoder.layers.0.
    self_attn.q_proj' is stored as 'vision_tower.vision_model.encoder.layers.0.self_attn.q_proj'); a
    module whose best match is not unique (or has none, a tied head) keeps its module name only."""
    stored = [k[: -len(".weight")] for k in checkpoint_keys if k.endswith(".weight")]
    found = []
    for name in names:
        parts = name.split(".")
        best, best_tail = [], 0
        for key in stored:
            key_parts = key.split(".")
            tail = 0
            while tail < min(len(parts), len(key_parts)) and parts[-1 - tail] == key_parts[-1 - tail]:
                tail += 1
            if tail > best_tail:
                best, best_tail = [key], tail
            elif tail == best_tail and tail:
                best.append(key)
        if len(best) == 1:
            found.append(best[0])
    return found


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


class ShardWriter:
    """Tensors into safetensors shards of about `max_bytes` each (0: one shard per `add`); a single shard
    is `model.safetensors`, several are `model-0000i-of-0000N.safetensors` with an index, as
    transformers' own `save_pretrained` lays them out."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.update(tensors)
        if sum(v.numel() * v.element_size() for v in self.pending.values()) >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(path), metadata={"format": "pt"})
        self.shards.append((path, sorted(self.pending)))
        self.total += sum(v.numel() * v.element_size() for v in self.pending.values())
        self.pending = {}

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, keys) in enumerate(self.shards, 1):
            name = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update({key: name for key in keys})
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n")


# An in-memory model is written in shards of this size (transformers' default); a lazily calibrated one
# a layer per shard, so host memory holds one layer.
MAX_SHARD_BYTES = 5 * 10**9


def _compress_layer(layer: nn.Module, grids: dict[str, QuantizedWeight], config) -> dict[str, torch.Tensor]:
    """The decoder layer's tensors as compressed-tensors stores them (packed or int8 weights + grids)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    layer_config = QuantizationConfig(config_groups=config.config_groups, ignore=[], format=config.format,
                                      quantization_status="frozen")
    apply_quantization_config(layer, layer_config, show_progress=False)
    for name, q in grids.items():
        module = layer.get_submodule(name)
        module.weight.data.copy_(q.weight.to(module.weight.dtype))
        _set_grid(module, q)
    ModelCompressor.from_pretrained_model(layer, quantization_format=config.format).compress_model(layer)
    return layer.state_dict()


def export_checkpoint(model: nn.Module, adapter: ModelAdapter, scheme: Scheme, layer_source, num_layers: int,
                      out_dir: str | Path, source_dir: str | Path, recipe_record: dict[str, Any] | None = None,
                      overwrite: bool = False, retire: tuple[Path, ...] = (),
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the compressed checkpoint in the source checkpoint's own layout.

    Every tensor outside the decoder layers is copied verbatim from the source shards, under its source
    name (what serving engines map: `visual.*`, `vision_tower.vision_model.*`, `language_model.*`), and
    each calibrated decoder layer is compressed on its own and stored under the source's layer prefix.
    `layer_source(i)` -> (decoder layer i holding its calibrated weights, {Linear name in the layer:
    QuantizedWeight}). config.json is the source's, with the quantization config added; the side files
    (tokenizer, chat template, generation config, a completed processor config) travel along.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    from tlq.models.lazy import CheckpointTensors

    tensors = CheckpointTensors(source_dir)
    prefix = tensors.layer_prefix()
    config = quantization_config(scheme, ignore_entries(model, adapter, set(tensors.keys())))
    start = time.perf_counter()
    with staged_output(Path(out_dir), overwrite, source_dir, recipe_record, retire) as staging:
        writer = ShardWriter(staging, max_shard_bytes)
        outside = [k for k in tensors.keys() if not k.startswith(prefix)]
        for begin in range(0, len(outside), 256):  # a few hundred tensors at a time, not the whole tower
            writer.add(tensors.get_many(outside[begin:begin + 256]))
        for index in range(num_layers):
            layer, grids = layer_source(index)
            writer.add({f"{prefix}{index}.{k}": v for k, v in _compress_layer(layer, grids, config).items()})
            # compressed-tensors leaves cyclic garbage per compressed layer (about a layer's weights at
            # hidden 1024): collected and handed back here, the export adds nothing to the run's peak.
            del layer, grids
            gc.collect()
            return_freed_memory()
        writer.finish()
        shutil.copy2(Path(source_dir) / "config.json", staging / "config.json")
        config.quantization_status = QuantizationStatus.COMPRESSED
        ModelCompressor(quantization_config=config).update_config(str(staging))
        if recipe_record is not None and "phase_seconds" in recipe_record:  # written after this block
            recipe_record["phase_seconds"]["export"] = round(time.perf_counter() - start, 3)
            _note_export_peak(recipe_record)
    return Path(out_dir)


def _note_export_peak(recipe_record: dict[str, Any]) -> None:
    """Add `export` to the record's phase peaks (tlq.phases) if writing raised the process's peak RSS."""
    from tlq.measure import peak_rss_bytes

    peaks = recipe_record.get("phase_peak_rss_mib")
    mark = round(peak_rss_bytes() / 2**20, 1)
    if peaks is not None and mark > max(peaks.values(), default=0.0):
        peaks["export"] = mark


def export_streamed(skeleton: nn.Module, adapter: ModelAdapter, scheme: Scheme, layers, layer_state,
                    out_dir: str | Path, source_dir: str | Path, recipe_record: dict[str, Any] | None = None,
                    overwrite: bool = False, retire: tuple[Path, ...] = ()) -> Path:
    """Write a lazily calibrated model: skeleton without decoder layers, its tlq.models.lazy.LazyLayers,
    and layer_state(i) -> (the calibrated layer's state dict, {Linear name in the layer: QuantizedWeight})."""

    def layer_source(index: int):
        layer = layers.empty_layer(index)
        state, grids = layer_state(index)
        layer.load_state_dict(state)
        return layer, grids

    return export_checkpoint(skeleton, adapter, scheme, layer_source, len(layers), out_dir, source_dir,
                             recipe_record, overwrite, retire, max_shard_bytes=0)


def export_compressed(model: nn.Module, adapter: ModelAdapter, scheme: Scheme, quantized: dict[str, QuantizedWeight],
                      out_dir: str | Path, source_dir: str | Path, recipe_record: dict[str, Any] | None = None,
                      overwrite: bool = False, retire: tuple[Path, ...] = ()) -> Path:
    """Save `model` (whose decoder Linears hold fake-quantized weights; `quantized` has their grids).

    The decoder layers are compressed in place: the model should not be used for inference afterwards.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TlqError(f"output {out_dir} already exists: remove it or pass --overwrite")
    missing = [n for n in adapter.quantized_linear_names(model) if n not in quantized]
    if missing:
        raise ValueError(f"{len(missing)} decoder Linears were not calibrated, e.g. {missing[0]}")
    check_exportable(model, adapter, scheme)
    layers = adapter.layers(model)

    def layer_source(index: int):
        prefix = f"{adapter.decoder_layers}.{index}."
        return layers[index], {n[len(prefix):]: q for n, q in quantized.items() if n.startswith(prefix)}

    return export_checkpoint(model, adapter, scheme, layer_source, len(layers), out_dir, source_dir, recipe_record,
                             overwrite, retire)
