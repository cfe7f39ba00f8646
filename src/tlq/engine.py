"""The one layer loop, shared by every algorithm.

    capture layer-0 inputs once (the model's own forward computes M-RoPE ids, masks, rotary cos/sin)
    for each decoder layer l:
        move layer l alone to the device
        [rescale its scaling groups: AWQ / MBQ / TLQ scale search, SmoothQuant]
        for each Linear group in solve order (q,k,v -> o -> gate,up -> down):
            run the layer on x~_l, feeding each Linear's inputs to its solver; solve; write Q(W) back
        x~_{l+1} = quantized layer l applied to x~_l        (quantization-exposed: the deployed path)
        move layer l back; activations stay on the CPU

Under torchrun every rank runs this loop on its own shard of the samples; the solvers' statistics,
the scale-search losses and the error report are combined through `Ranks` (tlq.distributed), so all
ranks hold the same quantized layer after each step. With a work directory (tlq.resume) each finished
layer and the next layer's inputs are saved, and a rerun continues after the last finished layer.

Inputs x~ always come from the already-quantized earlier layers, and with an activation scheme every
quantized Linear fake-quantizes its input per token both while observing and while propagating, so
calibration sees exactly what the deployed model computes. The FP-path stream x_l (the FP model's
activations) is kept only when the recipe asks for it: the asymmetric target, or exposure off.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from tlq.activations import (LayerInputs, activation_list, capture_layer_inputs, capture_linear_inputs, check_finite,
                             install_activation_quant, resolve_device, run_layer,
                             run_with_hooks)
from tlq import faults
from tlq.data import Sample
from tlq.distributed import SINGLE, Ranks
from tlq.errors import TlqError
from tlq.models import ModelAdapter
from tlq.phases import PhaseClock
from tlq.quant import QuantizedWeight, solver_factory
from tlq.recipe import Recipe
from tlq.rescale import rescale_layer

log = logging.getLogger(__name__)

# token_weights(layer_index, linear_name, sample_index) -> weights [tokens] or None (uniform)
TokenWeights = Callable[[int, str, int], "torch.Tensor | None"]


@dataclass
class LayerReport:
    index: int
    relative_error: float  # ||quantized layer(x~) - FP layer(x~)|| / ||FP layer(x~)||
    seconds: float
    rescaled: list[dict] = field(default_factory=list)
    resumed: bool = False  # loaded from the work directory, not recomputed
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (tlq.phases)


def _solve_group(solvers: dict, ranks: Ranks) -> dict[str, QuantizedWeight]:
    """Solve a Linear group: statistics summed onto each Linear's owner rank, solved there, broadcast.

    Owners are balanced by Hessian size, so a group's solves run in parallel over the ranks. Solvers
    without statistics (RTN) are solved on every rank alike.
    """
    names = list(solvers)
    shared = [n for n in names if ranks.distributed and solvers[n].needs_inputs]
    owners = dict(zip(shared, ranks.owners([float(solvers[n].weight.shape[1]) ** 2 for n in shared])))
    for name in shared:
        reduced = [ranks.sum_to(t, owners[name]) for t in solvers[name].statistics()]
        if owners[name] == ranks.rank:
            solvers[name].load_statistics(reduced)
    results = {name: _solve(name, solvers[name]) for name in names if owners.get(name, ranks.rank) == ranks.rank}
    for name in shared:
        owner = owners[name]
        shapes = ranks.gather_objects(None if owner != ranks.rank else
                                      [(tuple(t.shape), str(t.dtype)) for t in results[name].tensors()])[owner]
        mine = results[name].tensors() if owner == ranks.rank else [
            torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1])) for shape, dtype in shapes]
        results[name] = QuantizedWeight(*[ranks.broadcast(t, owner) for t in mine])
    return {name: results[name] for name in names}


def _solve(name: str, solver) -> QuantizedWeight:
    try:
        return solver.solve()
    except TlqError as exc:
        raise TlqError(f"{name}: {exc}") from None


@dataclass
class CalibrationResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # full Linear name -> weight + grid
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, this run's layers only


class _Observer:
    """Forward pre-hook that hands a Linear's (possibly activation-quantized) input to its solver."""

    def __init__(self, solver, layer_index: int, name: str, token_weights: TokenWeights | None,
                 fp_inputs: list[torch.Tensor] | None) -> None:
        self.solver, self.layer_index, self.name = solver, layer_index, name
        self.token_weights, self.fp_inputs = token_weights, fp_inputs
        self.sample = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        weights = self.token_weights(self.layer_index, self.name, self.sample) if self.token_weights else None
        target = self.fp_inputs[self.sample].to(x.device) if self.fp_inputs is not None else None
        self.solver.observe(x, None if weights is None else weights.to(x.device), target)


def fp_view(layer: nn.Module) -> nn.Module:
    """A copy of `layer` whose parameters share storage with it: its FP weights, without a copy now.

    Sound because calibration never writes into a layer's tensors: scale folding and solved weights
    rebind `.data` to new tensors, so this copy keeps the old ones (tests/test_engine.py checks it for
    every method). The old tensors then stay alive as long as the view does.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=False) for p in layer.parameters()}
    memo.update({id(b): b for b in layer.buffers()})
    return copy.deepcopy(layer, memo)


def _fp_outputs(layer: nn.Module, inputs: LayerInputs, fp_inputs: LayerInputs | None, device: torch.device):
    """What the FP layer computes, taken before anything changes (so no FP copy of the layer is kept
    through the solves; it would double a layer's host memory): its outputs on the quantized-path inputs
    (the error report's reference) and on the FP-path inputs (the FP stream), both spillable."""
    reference_outputs = activation_list(out.cpu() for _, out in run_layer(layer, inputs, device))
    fp_outputs = None
    if fp_inputs is inputs:  # exposure off: one stream, already computed
        fp_outputs = LayerInputs(reference_outputs, fp_inputs.kwargs)
    elif fp_inputs is not None:
        fp_outputs = LayerInputs(activation_list(out.cpu() for _, out in run_layer(layer, fp_inputs, device)),
                                 fp_inputs.kwargs)
    return reference_outputs, fp_outputs


def _observe(layer: nn.Module, index: int, inputs: LayerInputs, solvers: dict, linears: dict, device,
             token_weights: TokenWeights | None, fp_scaled: nn.Module | None, fp_inputs: LayerInputs | None) -> None:
    """Run the layer once, handing each observed Linear's input (and FP-path input) to its solver."""
    observed = [name for name, s in solvers.items() if s.needs_inputs]
    if not observed:
        return
    fp_linear_inputs = capture_linear_inputs(fp_scaled, observed, fp_inputs, device) if fp_scaled is not None else {}
    observers = {name: _Observer(solvers[name], index, name, token_weights, fp_linear_inputs.get(name))
                 for name in observed}

    def set_sample(i: int) -> None:
        for obs in observers.values():
            obs.sample = i

    handles = [linears[name].register_forward_pre_hook(obs) for name, obs in observers.items()]
    run_with_hooks(layer, inputs, device, handles, set_sample)


def _propagate(layer: nn.Module, index: int, inputs: LayerInputs, reference_outputs, device):
    """The quantized layer's outputs (the next layer's calibration inputs) and the squared error and norm
    against the FP layer's outputs on the same inputs."""
    outputs, error_sq, norm_sq = activation_list(), 0.0, 0.0
    for i, out in run_layer(layer, inputs, device):
        check_finite(out, f"after decoder layer {index}")
        ref = reference_outputs[i].to(device)
        error_sq += float((out.float() - ref.float()).pow(2).sum())
        norm_sq += float(ref.float().pow(2).sum())
        outputs.append(out.cpu())
    return outputs, error_sq, norm_sq


@torch.no_grad()
def calibrate_layer(layer: nn.Module, index: int, inputs: LayerInputs, adapter: ModelAdapter, recipe: Recipe,
                    device: torch.device, token_weights: TokenWeights | None = None, prefix: str = "",
                    fp_inputs: LayerInputs | None = None, ranks: Ranks = SINGLE, clock: PhaseClock | None = None):
    """Quantize one decoder layer (already on `device`) in place on its calibration inputs.

    Returns (quantized weights keyed `prefix + linear name`, the quantized layer's outputs = the next
    layer's inputs, the FP layer's outputs on `fp_inputs` or None, a LayerReport).
    """
    start = time.perf_counter()
    clock = PhaseClock(clock.show if clock is not None else None)
    scheme = recipe.resolved_scheme()
    make_solver = solver_factory(recipe.plan().solver)
    groups = adapter.linear_groups if recipe.true_sequential else (adapter.linear_names,)
    with clock("reference"):
        reference_outputs, fp_outputs = _fp_outputs(layer, inputs, fp_inputs, device)
    rescaled = []
    if recipe.plan().transform is not None:
        with clock("rescale"):
            rescaled = rescale_layer(layer, index, inputs, adapter, recipe, device, token_weights, fp_inputs, ranks)
    asymmetric = recipe.target == "asymmetric" and fp_inputs is not None and fp_inputs is not inputs
    # The asymmetric target needs the FP-path inputs of each Linear, through FP weights scaled like `layer`.
    fp_scaled = fp_view(layer) if asymmetric else None
    linears = {name: layer.get_submodule(name) for name in adapter.linear_names}
    act_hooks = install_activation_quant(list(linears.values()), scheme)
    quantized: dict[str, QuantizedWeight] = {}
    try:
        for group in groups:
            solvers = {name: make_solver(linears[name].weight.data, scheme, recipe) for name in group}
            with clock("observe"):
                _observe(layer, index, inputs, solvers, linears, device, token_weights, fp_scaled, fp_inputs)
            with clock("solve"):
                solved = _solve_group(solvers, ranks)
            del solvers  # their statistics (Hessians) are no longer needed
            for name, result in solved.items():
                # The solved tensor becomes the weight (no second copy of the layer's weights on the host).
                linears[name].weight.data = result.weight.to(linears[name].weight.device, linears[name].weight.dtype)
                quantized[prefix + name] = QuantizedWeight(weight=linears[name].weight.data.cpu(),
                                                           scale=result.scale.cpu(), zero_point=result.zero_point.cpu())
            del solved
        with clock("propagate"):
            outputs, error_sq, norm_sq = _propagate(layer, index, inputs, reference_outputs, device)
    finally:
        for handle in act_hooks:
            handle.remove()
    del reference_outputs
    error_sq, norm_sq = ranks.sum(torch.tensor([error_sq, norm_sq], dtype=torch.float64)).tolist()
    report = LayerReport(index, (error_sq / max(norm_sq, 1e-30)) ** 0.5, time.perf_counter() - start, rescaled,
                         phases=clock.rounded())
    return quantized, LayerInputs(hidden=outputs, kwargs=inputs.kwargs), fp_outputs, report


def _first_inputs(model, adapter: ModelAdapter, samples: list[Sample], recipe: Recipe, device, clock: PhaseClock):
    """Layer 0's inputs captured from the model's own forward, and the FP-path stream when the recipe
    keeps one (the asymmetric target; with exposure off it is the same stream)."""
    with clock("capture"):
        inputs = capture_layer_inputs(model, adapter, samples, device)
    for hidden in inputs.hidden:
        check_finite(hidden, "entering decoder layer 0")
    return inputs, inputs if (recipe.target == "asymmetric" or not recipe.exposure) else None


def _keep_layer(result: CalibrationResult, layers, work, clock: PhaseClock, layer: nn.Module, quantized: dict,
                report: LayerReport, inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
    """Record a finished layer: in the result (resident layers), and in the work directory if any."""
    if not layers.lazy:
        result.quantized.update(quantized)
    result.layers.append(report)
    if work is not None:
        with clock("save"):
            work.save_layer(report.index, layer, quantized, dataclasses.asdict(report), inputs.hidden,
                            fp_inputs.hidden if fp_inputs is not None and fp_inputs is not inputs else None)


def _layer_done(report: LayerReport) -> None:
    log.info("layer %d: relative output error %.5f (%.1f s)", report.index, report.relative_error, report.seconds)
    faults.reached(f"layer-{report.index}-saved")


def _restore_finished(work, layers, result: CalibrationResult, inputs: LayerInputs,
                      fp_inputs: LayerInputs | None, recipe: Recipe):
    """Layers finished before a crash are restored from the work directory, not recomputed; returns the
    first layer to calibrate and its input streams."""
    first = work.finished if work is not None else 0
    for index in range(first):
        quantized, report = work.load_layer(index, None if layers.lazy else layers.layers[index])
        result.quantized.update(quantized)
        result.layers.append(LayerReport(**{**report, "resumed": True}))
    if first:
        hidden, fp_hidden = work.load_inputs(first)
        inputs = LayerInputs(activation_list(hidden), inputs.kwargs)
        if fp_inputs is not None:
            fp_inputs = LayerInputs(activation_list(fp_hidden), inputs.kwargs) if recipe.exposure else inputs
        log.info("resumed from %s: layers 0..%d were finished", work.path, first - 1)
    return first, inputs, fp_inputs


@torch.no_grad()
def quantize_layers(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], recipe: Recipe,
                    token_weights: TokenWeights | None = None, progress: bool = True,
                    on_layer_inputs: Callable[[int, LayerInputs], None] | None = None, ranks: Ranks = SINGLE,
                    work=None, layers=None) -> CalibrationResult:
    """Calibrate and fake-quantize every decoder Linear of `model` in place; returns weights and grids.

    `samples` are this rank's shard; `token_weights` is indexed by this rank's sample numbers. `work`
    (a tlq.resume.WorkDir, opened) makes the run resumable. `layers` (tlq.models.lazy) says where decoder
    layers come from: resident in `model` (default), or read from the checkpoint one at a time, in which
    case finished layers live only in the work directory and `result.quantized` stays empty.
    """
    from tqdm.auto import tqdm

    from tlq.models.lazy import ResidentLayers

    start = time.perf_counter()
    device = resolve_device(recipe.device)
    result = CalibrationResult()
    clock = PhaseClock()
    inputs, fp_inputs = _first_inputs(model, adapter, samples, recipe, device, clock)
    layers = layers if layers is not None else ResidentLayers(model, adapter)
    if layers.lazy and work is None:
        raise ValueError("lazy layers need a work directory to keep the calibrated layers in")
    prefix = f"{adapter.decoder_layers}."
    first, inputs, fp_inputs = _restore_finished(work, layers, result, inputs, fp_inputs, recipe)
    bar = tqdm(range(first, len(layers)), desc=f"{recipe.method} {recipe.resolved_scheme().name}",
               disable=not progress or not ranks.main, initial=first, total=len(layers))
    clock.show = bar.set_postfix_str  # the bar says which phase of the layer is running
    for index in bar:
        if on_layer_inputs is not None:
            on_layer_inputs(index, inputs)
        layer = layers.load(index, device)
        quantized, outputs, fp_outputs, report = calibrate_layer(
            layer, index, inputs, adapter, recipe, device, token_weights, f"{prefix}{index}.", fp_inputs, ranks,
            clock)
        clock.merge(report.phases)
        layer.to("cpu")
        if recipe.exposure:
            inputs, fp_inputs = outputs, fp_outputs
        else:  # ablation: every layer calibrated on the FP model's activations
            inputs = fp_inputs = fp_outputs
        _keep_layer(result, layers, work, clock, layer, quantized, report, inputs, fp_inputs)
        layers.release(index)
        del layer
        bar.set_postfix_str(f"rel_err={report.relative_error:.4f}")
        _layer_done(report)
    result.seconds = time.perf_counter() - start
    result.phases = clock.rounded()
    return result
