"""Lazy decoder layers: host memory holds one layer at a time, not the checkpoint.

The model is loaded without its decoder layers (a config with zero layers, so transformers loads the
vision tower, projector, embeddings, final norm and head with its own key mapping, and leaves the layer
tensors on disk). Each decoder layer is then built from its class and filled from the safetensors shards
only while the layer loop (or the streamed importance pass) works on it, and dropped afterwards.

`ResidentLayers` is the same interface over an ordinary, fully loaded model, so the layer loop has one
code path for both.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from tlq.errors import TlqError
from tlq.models import (ModelAdapter, adapter_for, from_pretrained_checked, load_config, read_model_type)
from tlq.models.weights import check_finite_parameters, check_loading_info, read_header, weight_files, weight_problem


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointTensors:
    """Tensors of a checkpoint by key, read from its safetensors shards on demand (memory-mapped)."""

    def __init__(self, model_dir: str | Path) -> None:
        # Every shard's header is checked against its file first (tlq.models.weights): a corrupt
        # shard is refused before anything is read from it.
        self.files: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        for path in weight_files(model_dir):
            self._headers[path] = read_header(path)
            self.files.update({key: path for key in self._headers[path][1]})

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._headers[self.files[key]][1][key]["shape"])

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors, read with plain file reads into fresh buffers (one copy, no memory map): the
        pages of layers already processed never count towards this process's resident memory."""
        out = {}
        for key in keys:
            path = self.files[key]
            start, header = self._headers[path]
            entry = header[key]
            begin, end = entry["data_offsets"]
            buffer = bytearray(end - begin)
            with open(path, "rb") as f:
                f.seek(start + begin)
                f.readinto(buffer)
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise TlqError(f"{path}: tensor {key} has dtype {entry['dtype']}, which tlq cannot read")
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            out[key] = tensor.reshape(entry["shape"])
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def layer_prefix(self) -> str:
        """The key prefix of decoder layer i is `prefix + str(i) + '.'` (e.g. 'model.layers.')."""
        found = {m.group(1) for key in self.files if (m := re.fullmatch(r"(.*\.layers\.)0\.input_layernorm\.weight", key))}
        if len(found) != 1:
            raise TlqError(f"cannot find the decoder layers in the checkpoint keys (found {sorted(found) or 'none'})")
        return found.pop()


class ResidentLayers:
    """The decoder layers of a fully loaded model: loading moves one to the device, releasing moves it back."""

    lazy = False

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.layers = adapter.layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int, device: torch.device) -> nn.Module:
        return self.layers[index].to(device)

    def release(self, index: int) -> None:
        self.layers[index].to("cpu")

    def resident(self, index: int) -> nn.Module | None:
        """Layer `index` as the model holds it, for restoring a finished layer into; None when lazy."""
        return self.layers[index]

    def keep(self, kept: dict, quantized: dict) -> None:
        """Record a finished layer's grids in `kept` (the calibration result's): the model holds the layer."""
        kept.update(quantized)


def _stored_transposed(stored: tuple[int, ...], expected: torch.Tensor) -> bool:
    """A fused 3-D expert tensor stored with its last two dimensions swapped (Qwen3-VL-MoE's hub layout,
    [E, H, 2I] for transformers' [E, 2I, H]); transformers transposes such tensors when it loads them."""
    shape = tuple(expected.shape)
    return len(shape) == 3 and stored != shape and stored == (shape[0], shape[2], shape[1])


def _oriented(value: torch.Tensor, transposed: bool) -> torch.Tensor:
    return value.transpose(-1, -2).contiguous() if transposed else value


class LazyLayers(ResidentLayers):
    """Decoder layers materialised from the checkpoint one at a time."""

    lazy = True

    def __init__(self, model: nn.Module, adapter: ModelAdapter, tensors: CheckpointTensors, layer_class: type,
                 text_config, num_layers: int, dtype: torch.dtype) -> None:
        self.layers = adapter.layers(model)
        self.experts = adapter.experts  # MoE: each layer's fused experts become Linears once read
        self.tensors, self.layer_class, self.text_config, self.dtype = tensors, layer_class, text_config, dtype
        self.prefix = tensors.layer_prefix()
        self.layers.extend(nn.Module() for _ in range(num_layers))  # placeholders, replaced while in use

    def _stored_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` on the meta device, as the checkpoint stores it (MoE experts fused)."""
        with torch.device("meta"):
            return self.layer_class(self.text_config, layer_idx=index).to(self.dtype)

    def _as_calibrated(self, layer: nn.Module) -> nn.Module:
        """The layer as calibration sees it: an MoE layer's experts as Linears (views of the fused ones)."""
        if self.experts is not None:
            from tlq.models.moe import unfuse_experts

            unfuse_experts([layer], self.experts)
        return layer

    def empty_layer(self, index: int) -> nn.Module:
        """Decoder layer `index`, as calibrated, with uninitialised CPU tensors of the checkpoint's dtype."""
        return self._as_calibrated(self._stored_layer(index)).to_empty(device="cpu")

    def load(self, index: int, device: torch.device) -> nn.Module:
        layer = self._stored_layer(index)
        keys = {name: f"{self.prefix}{index}.{name}" for name in layer.state_dict()}
        missing = [key for key in keys.values() if key not in self.tensors.files]
        if missing:
            raise TlqError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more) for decoder layer {index}")
        expected = layer.state_dict()
        transposed = {name for name, key in keys.items() if _stored_transposed(self.tensors.shape(key), expected[name])}
        for name, key in keys.items():
            if self.tensors.shape(key) != tuple(expected[name].shape) and name not in transposed:
                raise TlqError(f"checkpoint tensor {key} has shape {list(self.tensors.shape(key))}, config.json "
                               f"says {list(expected[name].shape)}: restore the checkpoint or its config.json")
        values = self.tensors.get_many(list(keys.values()))
        for key, value in values.items():
            problem = weight_problem(value)
            if problem:
                raise TlqError(f"checkpoint tensor {key} {problem}: the checkpoint is corrupt; restore it")
        # assign=True: the freshly read tensors become the parameters (no second copy of the layer).
        layer.load_state_dict({name: _oriented(values[key], name in transposed).to(self.dtype)
                               for name, key in keys.items()}, assign=True)
        layer = self._as_calibrated(layer)
        layer.eval().requires_grad_(False)
        self.layers[index] = layer.to(device)
        return self.layers[index]

    def release(self, index: int) -> None:
        self.layers[index] = nn.Module()

    def resident(self, index: int) -> None:
        return None

    def keep(self, kept: dict, quantized: dict) -> None:
        """Nothing: a finished lazy layer lives only in the work folder (tlq.resume.WorkDir saves it)."""


def load_lazy(model_dir: str | Path, dtype: str = "auto", trust_remote_code: bool = False):
    """(model without decoder layers, adapter, LazyLayers) for a local checkpoint."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    adapter = adapter_for(read_model_type(model_dir))
    tensors = CheckpointTensors(model_dir)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    adapter = adapter.bound_to(config)  # MoE: every expert's Linears named
    text = config.get_text_config()
    num_layers, layer_types = text.num_hidden_layers, getattr(text, "layer_types", None)
    text.num_hidden_layers = 1
    if layer_types is not None:
        text.layer_types = layer_types[:1]
    with torch.device("meta"):
        layer_class = type(adapter.layers(AutoModelForImageTextToText.from_config(config))[0])
    # Zero layers, but the layer kinds stay: modules built once for all layers from them (Gemma 3's rotary
    # tables, one per kind) must know every kind.
    text.num_hidden_layers = 0
    if layer_types is not None:
        text.layer_types = layer_types
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the layers' keys, left out on purpose
    try:
        model, info = from_pretrained_checked(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                              config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The layers' keys are "unexpected" on purpose: they are read one layer at a time, and checked then.
    layer_keys = (tensors.layer_prefix(), adapter.decoder_layers + ".")
    check_loading_info(model_dir, info, ignore_unexpected=layer_keys)
    check_finite_parameters(model, model_dir)
    stored = [k for k in tensors.keys() if k.startswith(tensors.layer_prefix())]
    beyond = sorted({int(k[len(tensors.layer_prefix()):].split(".")[0]) for k in stored} - set(range(num_layers)))
    if beyond:
        raise TlqError(f"{model_dir}: the weights hold decoder layer {beyond[0]} but config.json says "
                       f"{num_layers} layers: config.json and the weights disagree")
    # The forward iterates over config.num_hidden_layers layers: give every config object the model
    # holds (transformers may have copied ours) the real count back.
    configs = {id(c): c for c in [text, model.config.get_text_config()] +
               [getattr(m, "config", None) for m in model.modules()] if c is not None}
    for sub in configs.values():
        if getattr(sub, "num_hidden_layers", None) == 0:
            sub.num_hidden_layers = num_layers
            if layer_types is not None:
                sub.layer_types = layer_types
    model.eval().requires_grad_(False)
    layer_dtype = next(model.get_submodule(adapter.final_norm).parameters()).dtype
    return model, adapter, LazyLayers(model, adapter, tensors, layer_class, text, num_layers, layer_dtype)
