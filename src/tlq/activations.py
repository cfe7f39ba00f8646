"""Layer inputs: capture them at decoder layer 0, replay a layer on them, fake-quantize activations.

Layer 0's inputs come from the model's own forward (vision tower, projector, embeddings, M-RoPE
positions, masks, rotary tables), stopped at the first decoder layer; every later layer is replayed
with the same keyword arguments. Activations live on the CPU between layers.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tlq.data import Sample
from tlq.errors import TlqError
from tlq.models import ModelAdapter
from tlq.quant import fake_quant_activation
from tlq.recipe import Scheme


class SpilledActivations:
    """A list of per-sample tensors kept in files instead of host memory (`--offload-dir`).

    Supports what the layer loop does with activations: append, index, iterate, len. Each tensor is one
    safetensors file; reading it back gives an exact copy.
    """

    _count = 0

    def __init__(self, folder: Path) -> None:
        SpilledActivations._count += 1
        self.folder = Path(folder) / f"list{SpilledActivations._count:06d}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.length = 0
        self.shapes: list[torch.Size] = []  # without reading the files back

    def append(self, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"t": tensor.detach().cpu().contiguous()}, str(self.folder / f"{self.length:06d}.safetensors"))
        self.shapes.append(tensor.shape)
        self.length += 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if not -self.length <= index < self.length:
            raise IndexError(index)
        return load_file(str(self.folder / f"{index % self.length:06d}.safetensors"))["t"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self.length))

    def __del__(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


_offload_dir: Path | None = None


@contextmanager
def offload_activations(folder: str | Path | None):
    """Within this block, activation lists created by the layer loop live in `folder` (None: in memory)."""
    global _offload_dir
    previous, _offload_dir = _offload_dir, (Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _offload_dir = previous


def activations_offloaded() -> bool:
    """Whether activation lists created now live on disk (inside `offload_activations`)."""
    return _offload_dir is not None


def token_rows(values: list | SpilledActivations, index: int) -> int:
    """How many token rows sample `index`'s activation has (all dimensions but the last), without loading a
    spilled one."""
    shape = values.shapes[index] if isinstance(values, SpilledActivations) else values[index].shape
    return int(torch.Size(shape[:-1]).numel())


def activation_list(values=()) -> list | SpilledActivations:
    """An empty (or filled) per-sample activation list: in memory, or on disk under offload_activations."""
    store = [] if _offload_dir is None else SpilledActivations(_offload_dir)
    for value in values:
        store.append(value)
    return store


@dataclass
class LayerInputs:
    """Per-sample hidden states entering a decoder layer, and the keyword arguments it is called with."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    # Per sample: decoder layer index -> (positions mask, features) that the model adds to that layer's
    # output (ModelAdapter.layer_injections); None for families without.
    injections: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None
    # Decoders with layers of several kinds (Gemma 3's sliding-window and global attention) call each kind
    # with its own mask and rotary embeddings: per kind, the per-sample keyword arguments of the first
    # layer of that kind, and the kind of every layer. None when every layer is called alike.
    kwargs_by_kind: dict[str, list[dict[str, Any]]] | None = None
    layer_kinds: tuple[str, ...] | None = None

    def entering(self, hidden: list[torch.Tensor], index: int) -> "LayerInputs":
        """These streams with `hidden` entering decoder layer `index` (its kind's keyword arguments)."""
        kwargs = self.kwargs
        if self.kwargs_by_kind is not None and index < len(self.layer_kinds):
            kwargs = self.kwargs_by_kind[self.layer_kinds[index]]
        return LayerInputs(hidden, kwargs, self.injections, self.kwargs_by_kind, self.layer_kinds)


@dataclass
class LayerStreams:
    """What a decoder layer is calibrated on. `quantized`: x~, the outputs of the already-quantized earlier
    layers (the deployed path). `fp`: the FP model's activations, kept only when the recipe needs them;
    its `mode` says how: "separate" (the asymmetric target: a second stream), "same" (exposure off: the
    calibration inputs are the FP activations themselves) or "none"."""

    quantized: LayerInputs
    fp: LayerInputs | None = None

    @property
    def mode(self) -> str:
        if self.fp is None:
            return "none"
        return "same" if self.fp is self.quantized else "separate"

    @property
    def separate_fp(self) -> LayerInputs | None:
        """The FP stream when it is a stream of its own (what must be computed and saved apart)."""
        return self.fp if self.mode == "separate" else None

    def entering(self, hidden: list[torch.Tensor], fp_hidden, index: int) -> "LayerStreams":
        """The streams with these activations entering layer `index` (`fp_hidden` is read only for a
        separate FP stream)."""
        quantized = self.quantized.entering(hidden, index)
        mode = self.mode
        fp = None if mode == "none" else quantized if mode == "same" else self.quantized.entering(fp_hidden, index)
        return LayerStreams(quantized, fp)


def next_layer_inputs(outputs, inputs: LayerInputs, index: int) -> LayerInputs:
    """What enters layer index + 1: layer `index`'s per-sample `outputs`, plus the features the model adds
    after that layer (exactly `hidden[mask] += features`, as Qwen3-VL's DeepStack does), with the next
    layer's keyword arguments."""
    if inputs.injections is not None and any(index in per_sample for per_sample in inputs.injections):
        outputs = activation_list(_inject(out, per_sample.get(index))
                                  for out, per_sample in zip(outputs, inputs.injections))
    return inputs.entering(outputs, index + 1)


def _inject(hidden: torch.Tensor, injection) -> torch.Tensor:
    if injection is None:
        return hidden
    mask, features = injection
    hidden = hidden.clone()
    hidden[mask.to(hidden.device), :] = hidden[mask.to(hidden.device), :] + features.to(hidden.device, hidden.dtype)
    return hidden


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TlqError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TlqError(f"device {name} requested but CUDA is not available: use --device cpu")
    return device


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer during capture: records the call's keyword arguments under the
    layer's kind (and, at layer 0, the hidden states), passes the hidden states on unchanged, and stops
    the forward at the last layer whose call is needed."""

    def __init__(self, store: LayerInputs, kind: str | None, first: bool, last: bool) -> None:
        super().__init__()
        self.store, self.kind, self.first, self.last = store, kind, first, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TlqError("decoder layer called with positional arguments tlq does not know how to replay")
        for key in ("cache", "past_key_values", "past_key_value", "use_cache", "cache_position"):
            kwargs.pop(key, None)
        kwargs = to_device(kwargs, torch.device("cpu"))
        if self.first:
            self.store.hidden.append(hidden_states.detach().cpu())
        if self.kind is None:
            self.store.kwargs.append(kwargs)
        else:
            self.store.kwargs_by_kind[self.kind].append(kwargs)
        if self.last:
            raise _Captured
        return hidden_states


def layer_kinds(model: nn.Module, num_layers: int) -> tuple[str, ...] | None:
    """The kind of each decoder layer when the model calls them differently (config `layer_types` with
    more than one kind), else None."""
    kinds = getattr(getattr(model.config, "text_config", model.config), "layer_types", None)
    if not kinds or len(set(kinds[:num_layers])) < 2:
        return None
    return tuple(kinds[:num_layers])


def _catchers(store: LayerInputs, kinds: tuple[str, ...] | None) -> nn.ModuleList:
    """One catcher for layer 0, or, with several layer kinds, one per layer up to the first of the last kind."""
    if kinds is None:
        return nn.ModuleList([_Catcher(store, None, first=True, last=True)])
    firsts = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}
    end = max(firsts.values())
    return nn.ModuleList([_Catcher(store, kinds[i] if firsts[kinds[i]] == i else None, first=i == 0, last=i == end)
                          for i in range(end + 1)])


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, samples: list[Sample],
                         device: torch.device) -> LayerInputs:
    """Run the model up to decoder layer 0 for each sample (vision tower, projector, embeddings on device)."""
    parent_name, _, attr = adapter.decoder_layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    kinds = layer_kinds(model, len(layers))
    store = LayerInputs(hidden=activation_list(), kwargs=[], layer_kinds=kinds,
                        kwargs_by_kind=None if kinds is None else {kind: [] for kind in kinds})
    setattr(parent, attr, _catchers(store, kinds))
    handles = _capture_injections(model, adapter, store)
    try:
        model.to(device)
        for sample in samples:
            try:
                model(**to_device(sample.inputs, device), use_cache=False)
            except _Captured:
                continue
            raise TlqError("the model's forward never reached decoder layer 0: unsupported model layout")
    finally:
        model.to("cpu")
        setattr(parent, attr, layers)
        for handle in handles:
            handle.remove()
    if kinds is not None:  # layer 0's arguments are its kind's
        store.kwargs = store.kwargs_by_kind[kinds[0]]
    return store


def _capture_injections(model: nn.Module, adapter: ModelAdapter, store: LayerInputs) -> list:
    """A hook recording, per sample, the features the model will add after decoder layers."""
    if adapter.layer_injections is None:
        return []
    module_name, mask_key, features_key = adapter.layer_injections
    store.injections = []

    def record(module, args, kwargs):
        mask, features = kwargs.get(mask_key), kwargs.get(features_key)
        if mask is None or features is None:  # a sample without an image
            store.injections.append({})
            return
        mask = mask.detach().cpu()
        store.injections.append({i: (mask, f.detach().cpu()) for i, f in enumerate(features)})

    return [model.get_submodule(module_name).register_forward_pre_hook(record, with_kwargs=True)]


def layer_output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device,
              before_sample: Callable[[int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Apply `layer` to every sample; yields (sample index, output on device)."""
    for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        if before_sample is not None:
            before_sample(i)
        yield i, layer_output(layer(hidden.to(device), **to_device(kwargs, device)))


def _activation_quant_hook(bits: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (fake_quant_activation(args[0], bits), *args[1:])

    return hook


def install_activation_quant(linears: list[nn.Linear], scheme: Scheme) -> list[torch.utils.hooks.RemovableHandle]:
    """Per-token dynamic fake-quant of each Linear's input, as the deployed W*A8 kernels compute."""
    if not scheme.quantizes_activations:
        return []
    return [linear.register_forward_pre_hook(_activation_quant_hook(scheme.act_bits)) for linear in linears]


def install_model_activation_quant(model: nn.Module, adapter: ModelAdapter, scheme: Scheme):
    """Activation fake-quant on every quantized Linear of the whole model (for evaluation)."""
    return install_activation_quant([model.get_submodule(n) for n in adapter.quantized_linear_names(model)], scheme)


def check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise TlqError(f"NaN or inf in activations {where}: load the model in float32 or bfloat16 (--dtype)")


@torch.no_grad()
def capture_linear_inputs(layer: nn.Module, names: list[str], inputs: LayerInputs, device: torch.device,
                          keep: Callable[[int, str], torch.Tensor | None] | None = None) -> dict[str, list[torch.Tensor]]:
    """Each named Linear's input [tokens, in] per sample (CPU); `keep(sample, name)` may pick token rows."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    current = [0]

    def hook(name: str):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            rows = keep(current[0], name) if keep is not None else None
            store[name].append((x if rows is None else x[rows.to(x.device)]).cpu())

        return record

    modules = [layer.get_submodule(n) for n in names]
    handles = [module.register_forward_pre_hook(hook(n)) for n, module in zip(names, modules)]
    run_with_hooks(layer, inputs, device, handles, lambda i: current.__setitem__(0, i), stop_after=modules)
    return store


class _StopForward(Exception):
    pass


class _Stopper:
    """Ends a sample's forward once every module in `modules` has been called (its inputs seen): the rest
    of the layer would compute outputs nobody reads. A module never called (an unrouted MoE expert)
    just lets the forward run to the end."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.all = {id(m) for m in modules}
        self.pending: set[int] = set()
        self.active = True
        self.handles = [m.register_forward_pre_hook(self._seen) for m in modules]

    def _seen(self, module: nn.Module, args: tuple) -> None:
        self.pending.discard(id(module))
        if self.active and not self.pending:
            raise _StopForward

    def reset(self, active: bool = True) -> None:
        """Arm for the next sample; an inactive stopper lets that sample's forward run to the end."""
        self.pending, self.active = set(self.all), active


def run_with_hooks(layer: nn.Module, inputs: LayerInputs, device: torch.device, handles: list,
                   before_sample: Callable[[int], None] | None = None, stop_after: list[nn.Module] = (),
                   outputs_of: int | None = 0) -> list | SpilledActivations:
    """Run `layer` over every sample for its hooks' side effects, then remove the hooks (also on error).

    With `stop_after`, each sample's forward stops once those modules have been called; their hooks in
    `handles` (registered earlier, so run first) have seen their inputs by then. The first `outputs_of`
    samples (every sample if None) run to the end all the same, and their outputs are returned (CPU): a
    pass that observes every sample but keeps only a few outputs runs the rest of the layer only for those.
    """
    stopper = _Stopper(list(stop_after)) if stop_after else None
    handles = list(handles) + (stopper.handles if stopper is not None else [])
    outputs = activation_list() if outputs_of != 0 else []
    try:
        for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            keep = outputs_of is None or i < outputs_of
            if not keep and not handles:  # (a stopper's own hooks are among the handles)
                break  # nothing reads the remaining samples
            if before_sample is not None:
                before_sample(i)
            if stopper is not None:
                stopper.reset(active=not keep)
            try:
                output = layer(hidden.to(device), **to_device(kwargs, device))
            except _StopForward:
                continue
            if keep:
                outputs.append(layer_output(output).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return outputs
