"""The rescaling step of a layer (AWQ, MBQ, TLQ's scale backend, SmoothQuant), before its Linears are solved.

For each scaling group that applies (norm -> Linears, and Linear -> Linear where the shapes match), a
run of the layer on the quantized-path inputs captures the targets' shared input (only the tokens the
token weights keep) and, for a block that mixes tokens (attention), the block's own call and FP output
per sample. The scale search then scores every candidate by the error of the block's output with the
targets scaled and fake-quantized as deployed (weights, and for W*A8 the per-token activations),
weighted per token by the importance of the block's output Linear.

One group at a time: capture, search, free, so host memory holds one group's data (the MLP's down
projection input alone is tokens x intermediate width), not every group's at once. The scales are
folded only after every group's search, so each search sees the unchanged layer its inputs were captured
from (the folds keep the FP function; the result is what capturing every group first gave, bit for bit).

Why the block and not the targets' own outputs: for q,k,v the error that matters is what the attention
makes of it. Scoring the concatenated q,k,v outputs let large-norm rows dominate and picked scales that
made the attention output worse than no scaling (benchmarks/results/qwen2_vl-small/awq_objective).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tlq.activations import LayerInputs, LayerStreams, layer_output, run_with_hooks, to_device
from tlq.context import RunContext
from tlq.distributed import Ranks
from tlq.models import ModelAdapter, ScalingGroup
from tlq.quant.primitives import fake_quant_activation, fake_quant_weight
from tlq.quant.scaling import (apply_scales, channel_magnitude, group_applies, search_scales, smoothquant_scales,
                               weight_magnitude, weighted_error)
from tlq.recipe import RunConfig, Scheme
from tlq.registry import Registry

CHUNK = 4096  # tokens per forward of a token-wise block during the search


@dataclass
class _Captured:
    """One scaling group's calibration data on this rank, per sample."""

    x: list[torch.Tensor] = field(default_factory=list)  # the targets' input, kept rows [kept, in]
    rows: list[torch.Tensor | None] = field(default_factory=list)  # kept token positions (None: all)
    calls: list[tuple] = field(default_factory=list)  # token-mixing blocks: the block's (args, kwargs)
    outputs: list[torch.Tensor] = field(default_factory=list)  # token-mixing blocks: FP output, kept rows


def _token_weights(token_weights, index: int, group: ScalingGroup, sample: int) -> torch.Tensor | None:
    return None if token_weights is None else token_weights(index, group.output_linear, sample)


def _capture(layer: nn.Module, groups: list[ScalingGroup], inputs: LayerInputs, device: torch.device,
             keep, with_blocks: bool) -> list[_Captured]:
    """One run of the layer: each group's targets' input rows and, for token-mixing blocks, the block's calls."""
    store = [_Captured() for _ in groups]
    current = [0]
    hooks = []

    def rows_of(position: int) -> torch.Tensor | None:
        rows = store[position].rows
        if len(rows) <= current[0]:
            rows.append(keep(current[0], groups[position]))
        return rows[current[0]]

    def pick(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        flat = tensor.reshape(-1, tensor.shape[-1])
        return (flat if rows is None else flat[rows.to(flat.device)]).cpu()

    for position, group in enumerate(groups):
        def target_input(module, args, position=position):
            store[position].x.append(pick(args[0], rows_of(position)))

        hooks.append(layer.get_submodule(group.targets[0]).register_forward_pre_hook(target_input))
        if with_blocks and group.mixes_tokens:
            def block_call(module, args, kwargs, position=position):
                store[position].calls.append(to_device((args, kwargs), torch.device("cpu")))

            def block_output(module, args, output, position=position):
                store[position].outputs.append(pick(layer_output(output), rows_of(position)))

            block = layer.get_submodule(group.block)
            hooks.append(block.register_forward_pre_hook(block_call, with_kwargs=True))
            hooks.append(block.register_forward_hook(block_output))
    run_with_hooks(layer, inputs, device, hooks, lambda i: current.__setitem__(0, i))
    return store


@contextmanager
def _scaled_and_quantized(targets: list[nn.Linear], scales: torch.Tensor, scheme: Scheme):
    """The targets as the deployed model computes them after folding `scales`: Q(W s) applied to x / s
    (fake-quantized per token under W*A8). The weights are restored on exit."""
    originals = [t.weight.data for t in targets]

    def scaled_input(module, args):
        x = args[0] / scales.to(args[0])
        return (fake_quant_activation(x, scheme.act_bits) if scheme.quantizes_activations else x, *args[1:])

    handles = []
    try:
        for target in targets:
            w = target.weight.data
            scaled = (w.float() * scales.to(w.device)[None, :]).to(w.dtype)
            target.weight.data = fake_quant_weight(scaled, scheme).weight.to(w.dtype)
            handles.append(target.register_forward_pre_hook(scaled_input))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for target, original in zip(targets, originals):
            target.weight.data = original


class _BlockObjective:
    """error(scales): the token-weighted error of the block's output with the targets scaled and quantized.

    items are (args, kwargs, kept rows or None, FP reference rows, token weights or None); the sum is
    taken over every rank's tokens.
    """

    def __init__(self, block: nn.Module, targets: list[nn.Linear], items: list[tuple], scheme: Scheme,
                 loss: str, device: torch.device, ranks: Ranks) -> None:
        self.block, self.targets, self.items = block, targets, items
        self.scheme, self.loss, self.device, self.ranks = scheme, loss, device, ranks

    def __call__(self, scales: torch.Tensor) -> float:
        total = 0.0
        with _scaled_and_quantized(self.targets, scales, self.scheme):
            for args, kwargs, rows, reference, weights in self.items:
                out = layer_output(self.block(*to_device(args, self.device), **to_device(kwargs, self.device)))
                out = out.reshape(-1, out.shape[-1])
                out = out if rows is None else out[rows.to(out.device)]
                diff = out.float() - reference.to(out.device).float()
                total += float(weighted_error(diff, None if weights is None else weights.to(out.device), self.loss))
        return float(self.ranks.sum(torch.tensor(total, dtype=torch.float64)))


def _token_wise_items(block: nn.Module, x: torch.Tensor, target_x: torch.Tensor | None,
                      weights: torch.Tensor | None) -> list[tuple]:
    """Chunks of the (subsampled) kept tokens with the FP block's output on them as the reference."""
    items = []
    for a in range(0, len(x), CHUNK):
        chunk = x[a:a + CHUNK]
        reference = layer_output(block(chunk if target_x is None else target_x[a:a + CHUNK])).detach()
        items.append(((chunk,), {}, None, reference, None if weights is None else weights[a:a + CHUNK]))
    return items


def _concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of the per-sample rows, emptying the list as it goes (never two copies of them alive)."""
    if not parts:
        return torch.empty(0)
    out = torch.empty(sum(len(p) for p in parts), parts[0].shape[-1], dtype=parts[0].dtype, device=parts[0].device)
    start = 0
    while parts:
        part = parts.pop(0)
        out[start:start + len(part)] = part
        start += len(part)
    return out


def _subsample(x, target_x, weights, max_tokens: int, seed: int, index: int, ranks: Ranks):
    """At most `max_tokens` tokens, drawn over all ranks' tokens (rank order = sample order), so that it
    is the same token set whatever the number of ranks."""
    counts = ranks.gather_objects(len(x))
    offset, total = sum(counts[:ranks.rank]), sum(counts)
    if total <= max_tokens:
        return x, target_x, weights, total
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    pick = torch.randperm(total, generator=generator)[:max_tokens]
    pick = (pick[(pick >= offset) & (pick < offset + len(x))] - offset).to(x.device)
    return (x[pick], None if target_x is None else target_x[pick], None if weights is None else weights[pick],
            max_tokens)


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


def _smooth_group(ctx: _GroupContext, group: ScalingGroup, data: _Captured, fp_data: _Captured | None,
                  kept: list[torch.Tensor | None]) -> tuple[torch.Tensor, dict]:
    """SmoothQuant: s = max|x|^a / max|W|^(1-a); no search."""
    targets = [ctx.layer.get_submodule(t) for t in group.targets]
    smooth = ctx.config.smoothquant
    x, _, _, tokens = _subsample(_concatenated(data.x).to(ctx.device), None, None, smooth.max_tokens, smooth.seed,
                                 ctx.index, ctx.ranks)
    scales = smoothquant_scales(x, targets, smooth.alpha, ctx.ranks)
    return scales, {"source": group.source, "alpha": smooth.alpha, "loss_ratio": None, "tokens": tokens}


def _search_group(ctx: _GroupContext, group: ScalingGroup, data: _Captured, fp_data: _Captured | None,
                  kept: list[torch.Tensor | None]) -> tuple[torch.Tensor, dict]:
    """The scale search on the block the group feeds; returns the scales and the group's record."""
    layer, search, device, ranks = ctx.layer, ctx.config.scale_search, ctx.device, ctx.ranks
    targets = [layer.get_submodule(t) for t in group.targets]
    weights = None if not kept or kept[0] is None else torch.cat(kept).to(device)
    x = _concatenated(data.x).to(device)
    magnitude = channel_magnitude(x, weights, ranks)
    block = layer.get_submodule(group.block)
    if group.mixes_tokens:
        references = fp_data.outputs if fp_data is not None else data.outputs
        items = [(args, kwargs, rows, ref, w) for (args, kwargs), rows, ref, w
                 in zip(data.calls, data.rows, references, kept)]
        tokens = sum(ranks.gather_objects(len(x)))
    else:
        target_x = _concatenated(fp_data.x).to(device) if fp_data is not None else None
        x, target_x, weights, tokens = _subsample(x, target_x, weights, search.max_tokens, search.seed, ctx.index,
                                                  ranks)
        items = _token_wise_items(block, x, target_x, weights)
    objective = _BlockObjective(block, targets, items, ctx.scheme, search.loss, device, ranks)
    weight = weight_magnitude(targets, ctx.scheme.group_size) if search.form != "activation" else None
    scales, choice, ratio = search_scales(magnitude, objective, search.grid, weight, search.form)
    return scales, {"source": group.source, "block": group.block, **choice, "loss_ratio": ratio, "tokens": tokens}


@dataclass(frozen=True)
class Transform:
    """A rescaling step: how each applicable scaling group gets its scales (`step`), and what it needs."""

    name: str
    # (ctx, group, captured, fp_captured or None, kept token weights) -> (scales, record); the loop folds them
    step: Callable[..., tuple[torch.Tensor, dict]]
    captures_blocks: bool = True  # it scores the blocks the groups feed, so their calls are captured
    norm_sources_only: bool = False  # it folds scales into norms only, never into a preceding Linear
    token_weighted: bool = True  # the step reads the token weights (their kept rows are passed)


TRANSFORMS: Registry[Transform] = Registry("transform")


def register_transform(transform: Transform) -> Transform:
    return TRANSFORMS.add(transform.name, transform)


# AWQ, MBQ and TLQ's scale backend: the search on the block each group feeds.
register_transform(Transform("scale_search", _search_group))
# SmoothQuant migrates activation outliers into the norms; no search, no token weights.
register_transform(Transform("smoothquant", _smooth_group, captures_blocks=False, norm_sources_only=True,
                             token_weighted=False))


def _group_data(layer: nn.Module, group: ScalingGroup, streams: LayerStreams, run: RunContext, index: int,
                transform: Transform) -> tuple[_Captured, _Captured | None, list[torch.Tensor | None]]:
    """One group's captured inputs on the quantized path (and the FP path for the asymmetric target) and its
    kept token weights per sample."""

    def keep(sample: int, group: ScalingGroup) -> torch.Tensor | None:
        w = _token_weights(run.token_weights, index, group, sample)
        return None if w is None else (w > 0).nonzero().squeeze(1)

    data = _capture(layer, [group], streams.quantized, run.device, keep, transform.captures_blocks)[0]
    fp_data = None
    if run.config.loop.target == "asymmetric" and streams.mode == "separate":
        fp_data = _capture(layer, [group], streams.fp, run.device, keep, transform.captures_blocks)[0]
    kept: list[torch.Tensor | None] = [None] * len(streams.quantized.hidden)
    if transform.token_weighted:
        per_sample = [_token_weights(run.token_weights, index, group, i) for i in range(len(kept))]
        kept = [None if w is None else w[w > 0] for w in per_sample]
    return data, fp_data, kept


@torch.no_grad()
def rescale_layer(layer: nn.Module, index: int, streams: LayerStreams, run: RunContext) -> list[dict]:
    """Find (or compute) the scales of every applicable group with the recipe's transform, one group at a
    time, then fold them all; returns one record per group."""
    transform = TRANSFORMS.get(run.config.plan.transform)
    groups = _applicable_groups(layer, run.adapter, transform)
    ctx = _GroupContext(layer, index, run.config, run.config.scheme, run.device, run.ranks)
    records, folds = [], []
    for group in groups:
        data, fp_data, kept = _group_data(layer, group, streams, run, index, transform)
        scales, record = transform.step(ctx, group, data, fp_data, kept)
        del data, fp_data  # this group's inputs and block calls, before the next group's capture
        records.append(record)
        folds.append((group, scales))
    for group, scales in folds:
        apply_scales(layer.get_submodule(group.source), [layer.get_submodule(t) for t in group.targets], scales,
                     group.source_weight_offset)
    return records
