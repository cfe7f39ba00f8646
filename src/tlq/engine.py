"""The one layer loop, shared by every algorithm.

    capture layer-0 inputs once (the model's own forward computes M-RoPE ids, masks, rotary cos/sin)
    for each decoder layer l:
        move layer l alone to the device
        for each Linear group in solve order (q,k,v -> o -> gate,up -> down):
            run the layer on x~_l, feeding each Linear's inputs to its solver; solve; write Q(W) back
        x~_{l+1} = quantized layer l applied to x~_l        (quantization-exposed: the deployed path)
        move layer l back; activations stay on the CPU

Inputs x~ always come from the already-quantized earlier layers, and with an activation scheme every
quantized Linear fake-quantizes its input per token both while observing and while propagating, so
calibration sees exactly what the deployed model computes.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tlq.data import Sample
from tlq.errors import TlqError
from tlq.models import ModelAdapter
from tlq.quant import QuantizedWeight, fake_quant_activation, solver_factory
from tlq.recipe import Recipe, Scheme

log = logging.getLogger(__name__)

# token_weights(layer_index, linear_name, sample_index) -> weights [tokens] or None (uniform)
TokenWeights = Callable[[int, str, int], "torch.Tensor | None"]


@dataclass
class LayerInputs:
    """Per-sample hidden states entering a decoder layer, and the keyword arguments it is called with."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@dataclass
class LayerReport:
    index: int
    relative_error: float  # ||quantized layer(x~) - FP layer(x~)|| / ||FP layer(x~)||
    seconds: float


@dataclass
class CalibrationResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # full Linear name -> weight + grid
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0


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


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0 during capture: records its call and stops the forward."""

    def __init__(self, store: LayerInputs) -> None:
        super().__init__()
        self.store = store

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TlqError("decoder layer called with positional arguments tlq does not know how to replay")
        for key in ("cache", "past_key_values", "past_key_value", "use_cache", "cache_position"):
            kwargs.pop(key, None)
        self.store.hidden.append(hidden_states.detach().cpu())
        self.store.kwargs.append(_to(kwargs, torch.device("cpu")))
        raise _Captured


def _check_uniform_layers(model: nn.Module, num_layers: int) -> None:
    # Every layer is replayed with layer 0's arguments; sliding-window layers would need their own mask.
    layer_types = getattr(getattr(model.config, "text_config", model.config), "layer_types", None)
    if layer_types and len(set(layer_types[:num_layers])) > 1:
        raise TlqError(f"mixed attention layer types {sorted(set(layer_types))} are not supported yet")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, samples: list[Sample],
                         device: torch.device) -> LayerInputs:
    """Run the model up to decoder layer 0 for each sample (vision tower, projector, embeddings on device)."""
    parent_name, _, attr = adapter.decoder_layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    _check_uniform_layers(model, len(layers))
    store = LayerInputs(hidden=[], kwargs=[])
    setattr(parent, attr, nn.ModuleList([_Catcher(store)]))
    try:
        model.to(device)
        for sample in samples:
            try:
                model(**_to(sample.inputs, device), use_cache=False)
            except _Captured:
                continue
            raise TlqError("the model's forward never reached decoder layer 0: unsupported model layout")
    finally:
        model.to("cpu")
        setattr(parent, attr, layers)
    return store


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device,
              before_sample: Callable[[int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Apply `layer` to every sample; yields (sample index, output on device)."""
    for i, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        if before_sample is not None:
            before_sample(i)
        yield i, _output(layer(hidden.to(device), **_to(kwargs, device)))


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


class _Observer:
    """Forward pre-hook that hands a Linear's (possibly activation-quantized) input to its solver."""

    def __init__(self, solver, layer_index: int, name: str, token_weights: TokenWeights | None) -> None:
        self.solver, self.layer_index, self.name, self.token_weights = solver, layer_index, name, token_weights
        self.sample = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        weights = None
        if self.token_weights is not None:
            weights = self.token_weights(self.layer_index, self.name, self.sample)
            if weights is not None:
                weights = weights.to(args[0].device)
        self.solver.observe(args[0], weights)


def _check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise TlqError(f"NaN or inf in activations {where}: load the model in float32 or bfloat16 (--dtype)")


@torch.no_grad()
def calibrate_layer(layer: nn.Module, index: int, inputs: LayerInputs, adapter: ModelAdapter, recipe: Recipe,
                    device: torch.device, token_weights: TokenWeights | None = None,
                    prefix: str = "") -> tuple[dict[str, QuantizedWeight], LayerInputs, LayerReport]:
    """Quantize one decoder layer (already on `device`) in place on its calibration inputs.

    Returns the quantized weights (keyed `prefix + linear name`), the layer's quantized outputs (the
    next layer's inputs, on the CPU) and its relative output error against the FP layer on the same inputs.
    """
    start = time.perf_counter()
    scheme = recipe.resolved_scheme()
    make_solver = solver_factory(recipe.method)
    groups = adapter.linear_groups if recipe.true_sequential else (adapter.linear_names,)
    reference = copy.deepcopy(layer)  # the FP layer, to measure this layer's error
    linears = {name: layer.get_submodule(name) for name in adapter.linear_names}
    act_hooks = install_activation_quant(list(linears.values()), scheme)
    quantized: dict[str, QuantizedWeight] = {}
    try:
        for group in groups:
            solvers = {name: make_solver(linears[name].weight.data, scheme, recipe) for name in group}
            observers = {name: _Observer(s, index, name, token_weights) for name, s in solvers.items()
                         if s.needs_inputs}
            if observers:
                def set_sample(i: int) -> None:
                    for obs in observers.values():
                        obs.sample = i

                handles = [linears[name].register_forward_pre_hook(obs) for name, obs in observers.items()]
                try:
                    for _ in run_layer(layer, inputs, device, set_sample):
                        pass
                finally:
                    for handle in handles:
                        handle.remove()
            for name, solver in solvers.items():
                result = solver.solve()
                linears[name].weight.data.copy_(result.weight)
                quantized[prefix + name] = QuantizedWeight(weight=result.weight.cpu(), scale=result.scale.cpu(),
                                                           zero_point=result.zero_point.cpu())
        # Propagate: the quantized layer's outputs are the next layer's calibration inputs.
        outputs, error_sq, norm_sq = [], 0.0, 0.0
        for i, out in run_layer(layer, inputs, device):
            _check_finite(out, f"after decoder layer {index}")
            ref = _output(reference(inputs.hidden[i].to(device), **_to(inputs.kwargs[i], device)))
            error_sq += float((out.float() - ref.float()).pow(2).sum())
            norm_sq += float(ref.float().pow(2).sum())
            outputs.append(out.cpu())
    finally:
        for handle in act_hooks:
            handle.remove()
    report = LayerReport(index, (error_sq / max(norm_sq, 1e-30)) ** 0.5, time.perf_counter() - start)
    return quantized, LayerInputs(hidden=outputs, kwargs=inputs.kwargs), report


@torch.no_grad()
def quantize_layers(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], recipe: Recipe,
                    token_weights: TokenWeights | None = None, progress: bool = True,
                    on_layer_inputs: Callable[[int, LayerInputs], None] | None = None) -> CalibrationResult:
    """Calibrate and fake-quantize every decoder Linear of `model` in place; returns weights and grids."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = resolve_device(recipe.device)
    result = CalibrationResult()
    inputs = capture_layer_inputs(model, adapter, samples, device)
    for hidden in inputs.hidden:
        _check_finite(hidden, "entering decoder layer 0")
    layers = adapter.layers(model)
    bar = tqdm(range(len(layers)), desc=f"{recipe.method} {recipe.resolved_scheme().name}", disable=not progress)
    for index in bar:
        if on_layer_inputs is not None:
            on_layer_inputs(index, inputs)
        layer = layers[index].to(device)
        quantized, inputs, report = calibrate_layer(layer, index, inputs, adapter, recipe, device, token_weights,
                                                    prefix=f"{adapter.decoder_layers}.{index}.")
        layers[index].to("cpu")
        result.quantized.update(quantized)
        result.layers.append(report)
        bar.set_postfix(rel_err=f"{report.relative_error:.4f}")
        log.info("layer %d: relative output error %.5f (%.1f s)", index, report.relative_error, report.seconds)
    result.seconds = time.perf_counter() - start
    return result
