"""The rescaling step of a layer (AWQ, MBQ, TLQ's scale backend, SmoothQuant), before its Linears are solved.

For each scaling group that applies (norm -> Linears, and Linear -> Linear where the shapes match), a
run of the layer on the quantized-path inputs captures the targets' shared input (only the tokens the
token weights keep; its channel magnitude alone for a block that mixes tokens, attention) and, for such a
block, the block's own call and FP output per sample (tlq.group_data). The scale search then scores every
candidate by the error of the block's output with the targets scaled and fake-quantized as deployed
(weights, and for W*A8 the per-token activations), weighted per token by the importance of the block's
output Linear.

One group at a time: capture, search, free, so host memory holds one group's data, not every group's at
once; and a token-wise group (the MLP, a lone Linear) keeps only the rows its search scores, a draw of at
most `--scale-max-tokens` (its channel magnitudes summed over every kept row as they pass), not all of
them: the MLP's down projection input is tokens x intermediate width. The scales are
folded only after every group's search, so each search sees the unchanged layer its inputs were captured
from (the folds keep the FP function; the result is what capturing every group first gave, bit for bit).

Why the block and not the targets' own outputs: for q,k,v the error that matters is what the attention
makes of it. Scoring the concatenated q,k,v outputs let large-norm rows dominate and picked scales that
made the attention output worse than no scaling (benchmarks/results/qwen2_vl-small/awq_objective).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tlq.activations import LayerStreams, layer_output, to_device
from tlq.context import RunContext
from tlq.distributed import Ranks
from tlq.group_data import CHUNK, Captured, concatenated, group_data, kept_magnitude, rescores
from tlq.models import ModelAdapter, ScalingGroup
from tlq.measure import return_freed_memory
from tlq.quant.base import LinearSolver, solver_class
from tlq.quant.gptq import add_gram_upper, assemble_gram, gram_blocks
from tlq.quant.primitives import fake_quant_activation, fake_quant_weight
from tlq.quant.scaling import (apply_scales, group_applies, search_scales, smoothquant_scales,
                               weight_magnitude, weighted_error)
from tlq.recipe import RunConfig, Scheme
from tlq.registry import Registry


# (W s, s, the target's position in the group) -> Q(W s)
WeightQuantizer = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _round_to_nearest(scheme: Scheme) -> WeightQuantizer:
    return lambda scaled, scales, position: fake_quant_weight(scaled, scheme).weight


def _solved_by(solver: type[LinearSolver], config, scheme: Scheme, hessians: list[torch.Tensor]) -> WeightQuantizer:
    """Q(W s) as the Linear's solver makes it for the scaled inputs x / s, whose Hessian is H / (s s^T)
    (`hessians[position]`: each target's own). Under W*A8 the Hessian is the unquantized inputs' (the
    per-token activation rounding depends on s in a way a rescaled H cannot follow); the scoring itself
    runs the deployed activations."""
    def quantize(scaled: torch.Tensor, scales: torch.Tensor, position: int) -> torch.Tensor:
        hessian = hessians[position]
        inverse = 1.0 / scales.to(hessian).float()
        # one new in x in matrix, which the solve takes as its workspace (a builder, not a tensor it copies)
        rescaled = lambda: torch.mul(hessian, inverse[:, None]).mul_(inverse[None, :])  # noqa: E731
        return solver.solve_given(scaled, rescaled, scheme, config).weight
    return quantize


def _input_hessian(x: torch.Tensor, weights: torch.Tensor | None, ranks: Ranks) -> torch.Tensor:
    """sum_t w_t x_t x_t^T / sum_t w_t over every rank's rows, in row chunks: GPTQ's upper-block float64
    Gram sums (half the products and half the float64 memory of the full x^T x), float32 result."""
    width = x.shape[-1]
    gram = [torch.zeros(stop - start, width - start, dtype=torch.float64, device=x.device)
            for start, stop in gram_blocks(width)]
    for start in range(0, len(x), CHUNK):
        rows = x[start:start + CHUNK].float()
        root = None if weights is None else weights[start:start + CHUNK].to(rows).clamp_min(0).sqrt()[:, None]
        add_gram_upper(gram, rows if root is None else rows * root)
    count = torch.tensor(float(len(x)) if weights is None else float(weights.double().sum()), dtype=torch.float64)
    gram = [ranks.sum(block) for block in gram]
    return assemble_gram(gram, 1.0, ranks.sum(count.to(x.device)).clamp_min(1e-30))


@contextmanager
def _scaled_and_quantized(targets: list[nn.Linear], scales: torch.Tensor, scheme: Scheme, quantize: WeightQuantizer):
    """The targets as the deployed model computes them after folding `scales`: Q(W s) applied to x / s
    (fake-quantized per token under W*A8). The weights are restored on exit."""
    originals = [t.weight.data for t in targets]

    def scaled_input(module, args):
        x = args[0] / scales.to(args[0])
        return (fake_quant_activation(x, scheme.act_bits) if scheme.quantizes_activations else x, *args[1:])

    handles = []
    try:
        for position, target in enumerate(targets):
            w = target.weight.data
            scaled = (w.float() * scales.to(w.device)[None, :]).to(w.dtype)
            target.weight.data = quantize(scaled, scales.to(w.device), position).to(w.dtype)
            handles.append(target.register_forward_pre_hook(scaled_input))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for target, original in zip(targets, originals):
            target.weight.data = original


@dataclass
class BlockRuns:
    """How many of a search's block forwards ran, of those scoring every candidate in full would run
    (a candidate's sum stops once it cannot make the shortlist: tlq.quant.scaling.search_scales)."""

    run: int = 0
    of: int = 0

    def record(self) -> dict:
        return {"block_runs": self.run, "block_runs_full": self.of}


class _BlockObjective:
    """error(scales): the token-weighted error of the block's output with the targets scaled and quantized.

    items are (args, kwargs, kept rows or None, FP reference rows, token weights or None); the sum is
    taken over every rank's tokens. `quantize` makes the targets' weights (round to nearest by default).
    `bounded(scales, above)` stops adding items once the sum passes `above` (its parts are never negative:
    the kept tokens' weights are > 0). One process only: with ranks, every rank must reach the same
    all-reduce, and a rank's own share says nothing of the total.
    """

    def __init__(self, block: nn.Module, targets: list[nn.Linear], items: list[tuple], scheme: Scheme,
                 loss: str, device: torch.device, ranks: Ranks, quantize: WeightQuantizer | None = None,
                 runs: BlockRuns | None = None) -> None:
        self.block, self.targets, self.items = block, targets, items
        self.scheme, self.loss, self.device, self.ranks = scheme, loss, device, ranks
        self.quantize = quantize or _round_to_nearest(scheme)
        self.runs = runs if runs is not None else BlockRuns()

    def with_quantizer(self, quantize: WeightQuantizer) -> "_BlockObjective":
        return _BlockObjective(self.block, self.targets, self.items, self.scheme, self.loss, self.device,
                               self.ranks, quantize, self.runs)

    def __call__(self, scales: torch.Tensor) -> float:
        return self.bounded(scales, None)

    def bounded(self, scales: torch.Tensor, above: float | None) -> float:
        if self.ranks.distributed:
            above = None
        total = 0.0
        self.runs.of += len(self.items)
        with _scaled_and_quantized(self.targets, scales, self.scheme, self.quantize):
            for args, kwargs, rows, reference, weights in self.items:
                out = layer_output(self.block(*to_device(args, self.device), **to_device(kwargs, self.device)))
                out = out.reshape(-1, out.shape[-1])
                out = out if rows is None else out[rows.to(out.device)]
                diff = out.float() - reference.to(out.device).float()
                total += float(weighted_error(diff, None if weights is None else weights.to(out.device), self.loss))
                self.runs.run += 1
                if above is not None and total > above:
                    break  # out of the running: the rest of the sum can only add to it
        return_freed_memory()  # the small blocks a candidate's pass left in heap holes (the threshold is 1 MiB)
        return float(self.ranks.sum(torch.tensor(total, dtype=torch.float64)))


def _token_wise_items(block: nn.Module, x: torch.Tensor, target_x: torch.Tensor | None,
                      weights: torch.Tensor | None, batched: bool = False) -> list[tuple]:
    """Chunks of the (subsampled) kept tokens with the FP block's output on them as the reference
    (`batched`: each chunk goes to the block as a batch of one)."""
    shaped = (lambda t: t[None]) if batched else (lambda t: t)
    items = []
    for a in range(0, len(x), CHUNK):
        chunk = x[a:a + CHUNK]
        reference = layer_output(block(shaped(chunk if target_x is None else target_x[a:a + CHUNK]))).detach()
        items.append(((shaped(chunk),), {}, None, reference.reshape(-1, reference.shape[-1]),
                      None if weights is None else weights[a:a + CHUNK]))
    return items


@dataclass
class _GroupContext:
    """What every group's step of one layer shares."""

    layer: nn.Module
    index: int
    config: RunConfig
    scheme: Scheme
    device: torch.device
    ranks: Ranks


def _applicable_groups(layer: nn.Module, adapter: ModelAdapter, transform: "Transform") -> list[ScalingGroup]:
    groups = []
    for group in adapter.scaling_groups:
        source = layer.get_submodule(group.source)
        if not group_applies(source, [layer.get_submodule(t) for t in group.targets]):
            continue
        if transform.norm_sources_only and isinstance(source, nn.Linear):
            continue
        groups.append(group)
    return groups


def _smooth_group(ctx: _GroupContext, group: ScalingGroup, data: Captured, fp_data: Captured | None,
                  kept: list[torch.Tensor | None]) -> tuple[torch.Tensor, dict]:
    """SmoothQuant: s = max|x|^a / max|W|^(1-a); no search."""
    targets = [ctx.layer.get_submodule(t) for t in group.targets]
    alpha = ctx.config.smoothquant.alpha
    scales = smoothquant_scales(concatenated(data.x).to(ctx.device), targets, alpha, ctx.ranks)
    return scales, {"source": group.source, "alpha": alpha, "loss_ratio": None, "tokens": data.tokens}


def _search_group(ctx: _GroupContext, group: ScalingGroup, data: Captured, fp_data: Captured | None,
                  kept: list[torch.Tensor | None]) -> tuple[torch.Tensor, dict]:
    """The scale search on the block the group feeds; returns the scales and the group's record."""
    layer, search, device, ranks = ctx.layer, ctx.config.scale_search, ctx.device, ctx.ranks
    targets = [layer.get_submodule(t) for t in group.targets]
    if group.routed and data.tokens < max(1, ctx.config.loop.expert_min_tokens):
        # an expert with too few routed tokens to measure is left unscaled (its Linears are rounded to
        # nearest for the same reason: tlq.engine)
        return torch.ones(targets[0].in_features, device=device), {
            "source": group.source, "block": group.block, "alpha": None, "loss_ratio": None,
            "tokens": data.tokens, "skipped": f"fewer than {max(1, ctx.config.loop.expert_min_tokens)} routed tokens"}
    weights = None if not kept or kept[0] is None else torch.cat(kept).to(device)
    block = layer.get_submodule(group.block)
    # of every kept row, summed as they were captured; returned on the host, moved to the layer's device
    # where the duo form divides it by the weights' magnitude
    magnitude = kept_magnitude(data, weights, ranks).to(device)
    x = concatenated(data.x).to(device)  # a block's input rows are captured only for the rescoring
    if group.mixes_tokens:
        references = fp_data.outputs if fp_data is not None else data.outputs
        items = [(args, kwargs, rows, ref, w) for (args, kwargs), rows, ref, w
                 in zip(data.calls, data.rows, references, kept)]
    else:  # captured as the subsample (group_data.capture)
        target_x = concatenated(fp_data.x).to(device) if fp_data is not None else None
        if weights is not None and data.sample.local is not None:
            weights = weights[data.sample.local.to(device)]
        items = _token_wise_items(block, x, target_x, weights, group.block_takes_batch)
    objective = _BlockObjective(block, targets, items, ctx.scheme, search.loss, device, ranks)
    target_weights = data.target_weights
    if target_weights is not None and data.sample is not None and data.sample.local is not None:
        target_weights = [w[data.sample.local] for w in target_weights]
    rescore = _solver_rescore(ctx, objective, x, weights, target_weights)
    weight = weight_magnitude(targets, ctx.scheme.group_size) if search.form != "activation" else None
    scales, choice, ratio = search_scales(magnitude, objective, search.grid, weight, search.form,
                                          search.alpha_one, rescore, search.rescore_top)
    return scales, {"source": group.source, "block": group.block, **choice, "loss_ratio": ratio,
                    "tokens": data.tokens, **objective.runs.record()}


def _solver_rescore(ctx: _GroupContext, objective: _BlockObjective, x: torch.Tensor, weights: torch.Tensor | None,
                    target_weights: list[torch.Tensor] | None) -> _BlockObjective | None:
    """With --scale-rescore-top k and a solver that reads inputs (GPTQ): the block error with the targets
    solved by it, each on the Hessian of the rows the search scores weighted as its own solve weights them
    (`target_weights`: each target's token weights, as TLQ's GPTQ weights each Linear's tokens by that
    Linear's importance; None: the search's weights, one Hessian shared by every target). Round to nearest
    alone picks among near-equal candidates without regard to what GPTQ then makes of them
    (benchmarks/results/qwen2_vl-large/scale_grid)."""
    if not rescores(ctx.config):
        return None
    solver = solver_class(ctx.config.plan.solver)
    if target_weights is None:
        hessians = [_input_hessian(x, weights, ctx.ranks)] * len(objective.targets)
    else:
        hessians = [_input_hessian(x, w.to(x.device), ctx.ranks) for w in target_weights]
    return objective.with_quantizer(_solved_by(solver, solver.config_of(ctx.config), ctx.scheme, hessians))


@dataclass(frozen=True)
class Transform:
    """A rescaling step: how each applicable scaling group gets its scales (`step`), and what it needs."""

    name: str
    # (ctx, group, captured, fp_captured or None, kept token weights) -> (scales, record); the loop folds them
    step: Callable[..., tuple[torch.Tensor, dict]]
    captures_blocks: bool = True  # it scores the blocks the groups feed, so their calls are captured
    norm_sources_only: bool = False  # it folds scales into norms only, never into a preceding Linear
    token_weighted: bool = True  # the step reads the token weights (their kept rows are passed)
    subsample_config: str = "scale_search"  # the RunConfig part whose max_tokens / seed draw the scored tokens


TRANSFORMS: Registry[Transform] = Registry("transform")


def register_transform(transform: Transform) -> Transform:
    return TRANSFORMS.add(transform.name, transform)


# AWQ, MBQ and TLQ's scale backend: the search on the block each group feeds.
register_transform(Transform("scale_search", _search_group))
# SmoothQuant migrates activation outliers into the norms; no search, no token weights.
register_transform(Transform("smoothquant", _smooth_group, captures_blocks=False, norm_sources_only=True,
                             token_weighted=False, subsample_config="smoothquant"))


@torch.no_grad()
def rescale_layer(layer: nn.Module, index: int, streams: LayerStreams, run: RunContext) -> list[dict]:
    """Find (or compute) the scales of every applicable group with the recipe's transform, one group at a
    time, then fold them all; returns one record per group."""
    transform = TRANSFORMS.get(run.config.plan.transform)
    groups = _applicable_groups(layer, run.adapter, transform)
    ctx = _GroupContext(layer, index, run.config, run.config.scheme, run.device, run.ranks)
    records, folds = [], []
    for group in groups:
        data, fp_data, kept = group_data(layer, group, streams, run, index, transform)
        scales, record = transform.step(ctx, group, data, fp_data, kept)
        del data, fp_data  # this group's inputs and block calls, before the next group's capture
        records.append(record)
        folds.append((group, scales))
    for group, scales in folds:
        apply_scales(layer.get_submodule(group.source), [layer.get_submodule(t) for t in group.folded], scales,
                     group.source_weight_offset)
    return records
