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
ranks hold the same quantized layer after each step. The loop calls its callbacks (tlq.callbacks) before
it starts and around every layer: the work directory (tlq.resume) is one, saving each finished layer and
the next layer's inputs, and putting finished layers back when a rerun continues after a crash.

Inputs x~ always come from the already-quantized earlier layers, and with an activation scheme every
quantized Linear fake-quantizes its input per token both while observing and while propagating, so
calibration sees exactly what the deployed model computes. The FP-path stream x_l (the FP model's
activations) is kept only when the recipe asks for it: the asymmetric target, or exposure off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from tlq.activations import (LayerInputs, LayerStreams, activation_list, capture_layer_inputs, check_finite,
                             install_activation_quant, next_layer_inputs, resolve_device, run_layer, token_rows)
from tlq.callbacks import FinishedLayer, LayerCallback, LoopStart
from tlq.context import RunContext, TokenWeights
from tlq import faults
from tlq.data import Sample
from tlq.distributed import SINGLE, Ranks, samples_per_chunk
from tlq.errors import TlqError
from tlq.measure import freed_memory_returned_promptly, return_freed_memory
from tlq.models import ModelAdapter
from tlq.phases import PhaseClock
from tlq.quant import QuantizedWeight, solver_factory
from tlq.observe import fp_view
from tlq.observe import observe as _observe
from tlq.recipe import Recipe, RunConfig
from tlq.replay import BlockReplay
from tlq.rescale import rescale_layer

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    relative_error: float  # ||quantized layer(x~) - FP layer(x~)|| / ||FP layer(x~)||, on REPORT_SAMPLES per rank
    seconds: float
    rescaled: list[dict] = field(default_factory=list)
    resumed: bool = False  # loaded from the work directory, not recomputed
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (tlq.phases)
    # MoE: calibration tokens routed to each expert Linear (all ranks), and the experts rounded to nearest
    # for having fewer than the recipe's expert_min_tokens.
    routed_tokens: dict[str, int] = field(default_factory=dict)
    rounded_experts: list[str] = field(default_factory=list)


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
        del reduced  # the solver owns the sums now (its solve frees them)
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
    rss_peaks: dict[str, int] = field(default_factory=dict)  # phases that raised the peak RSS (tlq.phases)


# The layer error report compares the quantized and FP layer outputs on each rank's first samples only:
# keeping the FP outputs of every sample through the solves would hold a third activation stream (at 2B
# widths and 128 samples 0.2 GB; at 72B widths and 512 samples of 1000 tokens, 8 GB of host memory).
REPORT_SAMPLES = 16


@dataclass
class _LayerRun:
    """One decoder layer's calibration: the layer, its input streams and what every step reads."""

    layer: nn.Module
    index: int
    streams: LayerStreams
    ctx: RunContext
    chunk: int  # samples per solver product (tlq.distributed.samples_per_chunk)
    linears: dict[str, nn.Module] = field(default_factory=dict)
    fp_scaled: nn.Module | None = None  # FP weights scaled like `layer` (the asymmetric target)
    references_kept: int | None = None  # samples whose FP outputs the reference pass keeps (None: all)
    routed_tokens: dict[str, int] = field(default_factory=dict)  # expert Linear -> tokens routed to it
    rounded: list[str] = field(default_factory=list)  # expert Linears rounded to nearest (too few tokens)
    replay: BlockReplay | None = None  # solved blocks' outputs, replayed on later passes (tlq.replay)

    @property
    def inputs(self) -> LayerInputs:  # x~: the quantized path
        return self.streams.quantized

    @property
    def fp_inputs(self) -> LayerInputs | None:
        return self.streams.fp

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def token_weights(self) -> TokenWeights | None:
        return self.ctx.token_weights


def _fp_stream(run: _LayerRun) -> LayerInputs | None:
    """The FP layer's outputs on a separate FP-path stream (the next layer's FP inputs), taken before
    anything changes, so no FP copy of the layer is kept through the solves (it would double a layer's
    host memory). None without such a stream; with exposure off the stream is `inputs` itself and its
    outputs are the reference outputs."""
    if run.streams.mode != "separate":
        return None
    outputs = activation_list(out.cpu() for _, out in run_layer(run.layer, run.fp_inputs, run.device))
    return next_layer_inputs(outputs, run.fp_inputs, run.index)


def _round_thin_experts(run: _LayerRun, solvers: dict, config: RunConfig, ranks: Ranks) -> None:
    """Experts routed fewer than `expert_min_tokens` calibration tokens (on all ranks together) get
    round-to-nearest instead of their solver: a Hessian of a handful of tokens fits them to those tokens
    alone, and one of no tokens would zero the weights."""
    routed = [name for name in solvers if name in run.routed_tokens]
    if not routed:
        return
    counts = ranks.sum(torch.tensor([run.routed_tokens[n] for n in routed], dtype=torch.float64)).tolist()
    for name, count in zip(routed, counts):
        run.routed_tokens[name] = int(count)
        if count < config.loop.expert_min_tokens:
            solvers[name] = solver_factory("rtn")(run.linears[name].weight.data, config)
            run.rounded.append(name)


def _propagate(run: _LayerRun, reference_outputs):
    """The quantized layer's outputs (the next layer's calibration inputs) and the squared error and norm
    against the FP layer's outputs on the same inputs (the samples whose reference was kept)."""
    outputs, error_sq, norm_sq = activation_list(), 0.0, 0.0
    replay = run.replay
    handles = replay.handles(run.device, record=False) if replay is not None else []
    try:
        for i, out in run_layer(run.layer, run.inputs, run.device, replay.set_sample if replay else None):
            check_finite(out, f"after decoder layer {run.index}")
            if replay is not None:
                replay.release(i)
            if i < len(reference_outputs):
                ref = reference_outputs[i].to(run.device)
                error_sq += float((out.float() - ref.float()).pow(2).sum())
                norm_sq += float(ref.float().pow(2).sum())
            outputs.append(out.cpu())
    finally:
        for handle in handles:
            handle.remove()
    return outputs, error_sq, norm_sq


def _write_back(run: _LayerRun, solved: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The solved weights are written into the layer's own tensors: one copy of the layer on the host (a
    new tensor bound beside a memory-mapped checkpoint tensor left both resident: the measured peak grew by
    a layer per layer). With an FP view of the layer (the asymmetric target) they are bound as new tensors
    instead, so the view keeps the FP values."""
    quantized = {}
    for name, result in solved.items():
        linear = run.linears[name]
        weight = result.weight.to(linear.weight.device, linear.weight.dtype)
        if run.fp_scaled is None:
            linear.weight.data.copy_(weight)
        else:
            linear.weight.data = weight
        quantized[name] = QuantizedWeight(weight=linear.weight.data.cpu(), scale=result.scale.cpu(),
                                                   zero_point=result.zero_point.cpu())
    return quantized


def _merges_reference(config: RunConfig) -> bool:
    """Whether the first Linear group can be observed in the FP reference pass (one forward fewer): the
    layer is unchanged until then unless a transform rescales it, and the group's inputs come before any
    quantized Linear unless a single group takes every Linear under an activation scheme."""
    return config.plan.transform is None and (config.loop.true_sequential or not config.scheme.quantizes_activations)


def _solve_groups(run: _LayerRun, groups, config: RunConfig, ranks: Ranks, clock: PhaseClock,
                  reference_outputs) -> tuple[dict[str, QuantizedWeight], Any, list]:
    """Observe and solve each Linear group in order, writing Q(W) back. Without `reference_outputs` the
    first group is observed in the FP reference pass, which returns them. Returns the solved weights
    (keyed by Linear name), the reference outputs and the activation-quant hooks left installed."""
    make_solver, scheme = solver_factory(config.plan.solver), config.scheme
    act_bits = scheme.act_bits if scheme.quantizes_activations else None
    quantized: dict[str, QuantizedWeight] = {}
    act_hooks = [] if reference_outputs is None else install_activation_quant(list(run.linears.values()), scheme)
    try:
        for group in groups:
            solvers = {name: make_solver(run.linears[name].weight.data, config) for name in group}
            if reference_outputs is None:
                with clock("reference"):
                    reference_outputs = _observe(run, solvers, act_bits, keep_outputs=True)
                act_hooks = install_activation_quant(list(run.linears.values()), scheme)
            else:
                with clock("observe"):
                    _observe(run, solvers)
            _round_thin_experts(run, solvers, config, ranks)
            with clock("solve"):
                return_freed_memory()
                solved = _solve_group(solvers, ranks)
            del solvers  # their statistics (Hessians) are no longer needed
            quantized.update(_write_back(run, solved))
            run.replay.solved(solved)
            del solved
            # What the observe and solve freed stays in the heap until trimmed: at 2B widths and 128 samples,
            # before the importance pass's heap fix, 2.4 GB entered the propagate phase untrimmed
            # (benchmarks/results/cost/layer_memory_probe-phases/tlq-*).
            return_freed_memory()
    except BaseException:
        for handle in act_hooks:
            handle.remove()
        raise
    return quantized, reference_outputs, act_hooks


@torch.no_grad()
def calibrate_layer(layer: nn.Module, index: int, streams: LayerStreams, ctx: RunContext, prefix: str = "",
                    clock: PhaseClock | None = None):
    """Quantize one decoder layer (already on the context's device) in place on its calibration streams.

    Returns (quantized weights keyed `prefix + linear name`, the quantized layer's outputs = the next
    layer's inputs, the FP layer's outputs on the FP stream or None, a LayerReport).
    """
    start = time.perf_counter()
    clock = clock.child() if clock is not None else PhaseClock()
    config, ranks, inputs = ctx.config, ctx.ranks, streams.quantized
    chunk = samples_per_chunk(int(ranks.sum(torch.tensor(len(inputs.hidden))).item()))
    run = _LayerRun(layer, index, streams, ctx, chunk)
    if streams.mode != "same":  # the reference serves only the error report
        run.references_kept = REPORT_SAMPLES
    reference_outputs = None
    with clock("reference"):  # before any change to the layer
        fp_outputs = _fp_stream(run)
        if not _merges_reference(config):
            reference_outputs = _observe(run, {}, keep_outputs=True)
    rescaled = []
    if config.plan.transform is not None:
        with clock("rescale"), freed_memory_returned_promptly():
            rescaled = rescale_layer(layer, index, streams, ctx)
    if config.loop.target == "asymmetric" and streams.mode == "separate":
        # The asymmetric target needs the FP-path inputs of each Linear, through FP weights scaled like `layer`.
        run.fp_scaled = fp_view(layer)
    run.linears = {name: layer.get_submodule(name) for name in ctx.adapter.linear_names}
    run.replay = BlockReplay(layer, ctx.adapter.blocks, [token_rows(inputs.hidden, i)
                                                         for i in range(len(inputs.hidden))])
    groups = ctx.adapter.linear_groups if config.loop.true_sequential else (ctx.adapter.linear_names,)
    quantized, reference_outputs, act_hooks = _solve_groups(run, groups, config, ranks, clock,
                                                            reference_outputs)
    if streams.mode == "same":
        fp_outputs = next_layer_inputs(reference_outputs, streams.fp, index)
    try:
        with clock("propagate"):
            outputs, error_sq, norm_sq = _propagate(run, reference_outputs)
    finally:
        for handle in act_hooks:
            handle.remove()
    del reference_outputs
    error_sq, norm_sq = ranks.sum(torch.tensor([error_sq, norm_sq], dtype=torch.float64)).tolist()
    report = LayerReport(index, (error_sq / max(norm_sq, 1e-30)) ** 0.5, time.perf_counter() - start, rescaled,
                         phases=clock.rounded(), **_expert_report(run, config))
    return {prefix + k: v for k, v in quantized.items()}, next_layer_inputs(outputs, inputs, index), fp_outputs, report


def check_recipe_fits(adapter: ModelAdapter, config: RunConfig) -> None:
    """Refuse recipes the model's structure cannot run, before any work."""
    if adapter.experts is not None and config.loop.target == "asymmetric":
        raise TlqError(f"{adapter.family}: the asymmetric target is not supported for routed experts (the FP "
                       "path routes tokens differently): use --target symmetric")


def _expert_report(run: _LayerRun, config: RunConfig) -> dict:
    """Tokens routed to each expert (read at its first Linear) and the experts rounded to nearest."""
    experts: dict[str, int] = {}
    for name, count in run.routed_tokens.items():
        experts.setdefault(name.rpartition(".")[0], count)
    rounded = sorted({name.rpartition(".")[0] for name in run.rounded})
    if rounded:
        log.warning("layer %d: %d experts were routed fewer than %d calibration tokens and are rounded to nearest "
                    "(RTN): %s", run.index, len(rounded), config.loop.expert_min_tokens,
                    ", ".join(f"{e} ({experts.get(e, 0)})" for e in rounded))
    return {"routed_tokens": experts, "rounded_experts": rounded}


def _first_inputs(model, samples: list[Sample], ctx: RunContext, clock: PhaseClock,
                  release_sample_inputs: bool = False) -> LayerStreams:
    """Layer 0's inputs captured from the model's own forward, and the FP-path stream when the recipe
    keeps one (the asymmetric target; with exposure off it is the same stream). The samples then keep
    only their token ids if `release_sample_inputs`."""
    check_recipe_fits(ctx.adapter, ctx.config)
    with clock("capture"):
        inputs = capture_layer_inputs(model, ctx.adapter, samples, ctx.device)
    for hidden in inputs.hidden:
        check_finite(hidden, "entering decoder layer 0")
    if release_sample_inputs:
        for sample in samples:
            sample.release_model_inputs()
    loop = ctx.config.loop
    return LayerStreams(inputs, inputs if (loop.target == "asymmetric" or not loop.exposure) else None)


def _layer_done(report: LayerReport) -> None:
    return_freed_memory()  # what the layer freed: after the last one, before the export reads the checkpoint
    log.info("layer %d: relative output error %.5f (%.1f s)", report.index, report.relative_error, report.seconds)
    faults.reached(f"layer-{report.index}-saved")


def _next_streams(outputs: LayerInputs, fp_outputs: LayerInputs | None, exposure: bool) -> LayerStreams:
    """The streams entering the next layer: the quantized layer's outputs (with the FP layer's beside
    them when kept); with exposure off (ablation), the FP model's activations alone."""
    return LayerStreams(outputs, fp_outputs) if exposure else LayerStreams(fp_outputs, fp_outputs)


@torch.no_grad()
def quantize_layers(model: nn.Module, adapter: ModelAdapter, samples: list[Sample], recipe: Recipe,
                    token_weights: TokenWeights | None = None, progress: bool = True, ranks: Ranks = SINGLE,
                    layers=None, callbacks: Sequence[LayerCallback] = (),
                    release_sample_inputs: bool = False) -> CalibrationResult:
    """Calibrate and fake-quantize every decoder Linear of `model` in place; returns weights and grids.

    `samples` are this rank's shard; `token_weights` is indexed by this rank's sample numbers. `layers`
    (tlq.models.lazy) says where decoder layers come from and where finished ones are kept: resident in
    `model` (default; their grids in `result.quantized`), or read from the checkpoint one at a time, in
    which case a callback must keep them (tlq.resume.WorkDir) and `result.quantized` stays empty.
    `callbacks` (tlq.callbacks) are called before the loop (resume), and before and after every layer.
    `release_sample_inputs`: the samples keep only their token ids once layer 0's inputs are captured."""
    from tqdm.auto import tqdm

    from tlq.models.lazy import ResidentLayers

    start, config = time.perf_counter(), recipe.resolve()  # resolved once: every layer reads the same parts
    ctx = RunContext(config, adapter, resolve_device(config.loop.device), ranks, token_weights)
    result, clock = CalibrationResult(), PhaseClock()
    layers = layers if layers is not None else ResidentLayers(model, adapter)
    begin = LoopStart(0, _first_inputs(model, samples, ctx, clock, release_sample_inputs))
    for callback in callbacks:
        begin = callback.resume(begin, layers, result)
    bar = tqdm(range(begin.first, len(layers)), desc=f"{config.method} {config.scheme.name}",
               disable=not progress or not ranks.main, initial=begin.first, total=len(layers))
    clock.show = bar.set_postfix_str  # the bar says which phase of the layer is running
    streams = begin.streams
    del begin  # it would hold the first layer's inputs (one s x T x d cache) through every later layer
    return_freed_memory()  # what the gradient pass, the capture and a resume freed; each layer trims as it is done
    for index in bar:
        for callback in callbacks:
            callback.layer_starting(index, streams)
        layer = layers.load(index, ctx.device)
        quantized, outputs, fp_outputs, report = calibrate_layer(
            layer, index, streams, ctx, f"{adapter.decoder_layers}.{index}.", clock)
        clock.merge(report.phases)
        layer.to("cpu")
        streams = _next_streams(outputs, fp_outputs, config.loop.exposure)
        layers.keep(result.quantized, quantized)
        result.layers.append(report)
        for callback in callbacks:
            callback.layer_finished(FinishedLayer(index, layer, quantized, report, streams, clock))
        layers.release(index)
        del layer
        bar.set_postfix_str(f"rel_err={report.relative_error:.4f}")
        _layer_done(report)
    result.seconds = time.perf_counter() - start
    result.phases, result.rss_peaks = clock.rounded(), clock.peaks
    return result
