"""What a scaling group's search reads (tlq.rescale): the rows its targets receive, captured by a run of
the layer on the quantized-path inputs, and the token weights that go with them.

Only the tokens the token weights keep (weight > 0) are captured. A block that mixes tokens (attention) is
scored on whole samples: the block's own call and FP output per sample, with the token-weighted channel
magnitude of its targets' input rows summed on the way (the rows themselves only when a rescoring solver
reads them: they are the call's input again, one more copy of the layer's inputs). A token-wise
group (the MLP, a lone Linear) keeps only the rows its search scores, a draw of at most `--scale-max-tokens`
over every rank's kept tokens, taken in place as the rows pass, with the token-weighted channel magnitude
of all kept rows summed on the way. A routed group (an MoE expert's up -> down) sees only its expert's
tokens, whose positions are known only in the forward: all of its rows are captured, then drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tlq.activations import LayerInputs, LayerStreams, layer_output, run_with_hooks, to_device, token_rows
from tlq.context import RunContext
from tlq.distributed import Ranks
from tlq.measure import return_freed_memory
from tlq.models import ScalingGroup
from tlq.models.moe import routed_rows

CHUNK = 4096  # rows per chunk of a token-wise group: its block's forwards during the search, its sums here


@dataclass
class Captured:
    """One scaling group's calibration data on this rank.

    A token-mixing block (attention) is scored on whole samples: its targets' input rows, the block's calls
    and FP outputs per sample. A token-wise group is scored on at most `max_tokens` of the kept tokens of
    every rank (`Subsample`): only those rows are kept, in the subsample's order, with the token-weighted
    channel magnitude of all kept rows summed on the way (float64, as `channel_magnitude` sums)."""

    # the targets' input rows, per sample (or the subsample; for a token-mixing block only when Keep.rows)
    x: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor | None] = field(default_factory=list)  # kept token positions per sample (None: all)
    calls: list[tuple] = field(default_factory=list)  # token-mixing blocks: the block's (args, kwargs)
    outputs: list[torch.Tensor] = field(default_factory=list)  # token-mixing blocks: FP output, kept rows
    magnitude_sums: torch.Tensor | None = None  # sum over kept rows of w |x| per channel (float64)
    sample: "Subsample | None" = None  # the rows scored (token-wise), and how many over all ranks
    # Each target's own token weights on this rank's kept rows, before the draw (None: the group's weights
    # serve every target): what that target's GPTQ weights its tokens by, for the rescoring's Hessians.
    target_weights: list[torch.Tensor] | None = None

    @property
    def tokens(self) -> int:
        return self.sample.tokens if self.sample is not None else 0


@dataclass(frozen=True)
class Keep:
    """What a capture keeps besides the channel magnitude of the kept rows: the targets' input rows
    (`rows`), and for a token-mixing block its calls (`calls`: what the search replays, the quantized
    path's) and its output rows (`outputs`: the reference)."""

    rows: bool = True
    calls: bool = False
    outputs: bool = False


def rescores(config) -> bool:
    """Whether the scale search scores its shortlist again with the targets solved by a solver that reads
    the group's input rows (--scale-rescore-top with GPTQ): only then are a block's input rows kept."""
    from tlq.quant.base import solver_class

    return config.scale_search.rescore_top > 0 and solver_class(config.plan.solver).needs_inputs


def group_token_weights(token_weights, index: int, group: ScalingGroup, sample: int) -> torch.Tensor | None:
    return None if token_weights is None else token_weights(index, group.output_linear, sample)


def weighted_abs_sums(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum over rows of w |x| per channel, in float64 (as `channel_magnitude` sums)."""
    absolute = x.float().abs().double()
    return absolute.sum(0) if weights is None else (absolute * weights.to(x.device).double()[:, None]).sum(0)


@dataclass
class Subsample:
    """Which of this rank's kept rows a token-wise group keeps: a random draw of at most `max_tokens` over
    every rank's kept tokens (rank order = sample order, so the same set whatever the number of ranks).
    `select[i]` indexes sample i's kept rows (in row order) and `slots[i]` says where each goes in the draw's
    order. None of them when everything is kept."""

    tokens: int  # over all ranks, after the draw
    kept: int = 0  # this rank's kept rows, before the draw
    local: torch.Tensor | None = None  # positions in this rank's concatenated kept rows, in the draw's order
    select: list[torch.Tensor] | None = None
    slots: list[torch.Tensor] | None = None


def plan_subsample(counts: list[int], max_tokens: int, seed: int, index: int, ranks: Ranks) -> Subsample:
    per_rank = ranks.gather_objects(sum(counts))
    offset, total = sum(per_rank[:ranks.rank]), sum(per_rank)
    if total <= max_tokens:
        return Subsample(total, sum(counts))
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    pick = torch.randperm(total, generator=generator)[:max_tokens]
    local = pick[(pick >= offset) & (pick < offset + sum(counts))] - offset
    ordered, slot = local.sort()  # the k-th kept row in row order is the slot[k]-th of the draw
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    spans = [((ordered >= a) & (ordered < b)).nonzero().squeeze(1) for a, b in zip(bounds[:-1], bounds[1:])]
    return Subsample(max_tokens, sum(counts), local, [ordered[k] - a for k, a in zip(spans, bounds)],
                     [slot[k] for k in spans])


def capture(layer: nn.Module, group: ScalingGroup, inputs: LayerInputs, device: torch.device, rows: list,
            keep: Keep, sample: Subsample | None, weights: list[torch.Tensor | None]) -> Captured:
    """Runs of the layer that capture the weighted channel magnitude of the group's targets' input rows
    (`rows[i]`: the kept positions of sample i, None = all) and what `keep` asks for; with `sample` (a
    token-wise group) only the subsample's rows."""
    store, current = Captured(rows=list(rows), sample=sample), [0]
    target = layer.get_submodule(group.input_at or group.targets[0])

    def kept(tensor: torch.Tensor) -> torch.Tensor:
        flat, row = tensor.reshape(-1, tensor.shape[-1]), rows[current[0]]
        return flat if row is None else flat[row.to(flat.device)]

    def target_input(module, args):
        x = kept(args[0])
        sums = weighted_abs_sums(x, weights[current[0]])
        store.magnitude_sums = sums if store.magnitude_sums is None else store.magnitude_sums + sums
        if not keep.rows:
            return
        if sample is None or sample.select is None:
            store.x.append(x.cpu())
            return
        if not store.x:  # the draw, filled in place in its order: never a second copy of it
            store.x.append(torch.empty(len(sample.local), x.shape[-1], dtype=x.dtype))
        store.x[0][sample.slots[current[0]]] = x[sample.select[current[0]].to(x.device)].cpu()

    hooks = [target.register_forward_pre_hook(target_input)]
    block = layer.get_submodule(group.block)
    if keep.calls:
        hooks.append(block.register_forward_pre_hook(
            lambda module, args, kwargs: store.calls.append(to_device((args, kwargs), torch.device("cpu"))),
            with_kwargs=True))
    if keep.outputs:
        hooks.append(block.register_forward_hook(
            lambda module, args, output: store.outputs.append(kept(layer_output(output)).cpu())))
    # A token-wise group needs nothing past its targets' input: each sample's forward stops there.
    run_with_hooks(layer, inputs, device, hooks, lambda i: current.__setitem__(0, i),
                   stop_after=[] if keep.outputs else [target])
    return store


def capture_routed(layer: nn.Module, group: ScalingGroup, inputs: LayerInputs, device: torch.device,
                   weights: list[torch.Tensor | None], max_tokens: int, seed: int, index: int,
                   ranks: Ranks) -> tuple[Captured, list[torch.Tensor | None]]:
    """A routed group's data (an expert's up -> down): the rows its target received, each weighted by its
    token's weight (`weights[i]` over sample i's tokens; rows of weight 0 dropped), then the draw of at most
    `max_tokens` of them over every rank. Returns the data and the kept rows' weights per call. Every row is
    held until the draw: an expert sees about top_k / experts of the tokens."""
    target = layer.get_submodule(group.targets[0])
    rows, kept, current = [], [], [0]

    def target_input(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        w = weights[current[0]]
        if w is not None:
            w = w.reshape(-1)[routed_rows(module)[0].to(w.device)]
            keep = (w > 0).nonzero().squeeze(1)
            x, w = x[keep.to(x.device)], w[keep]
        rows.append(x.cpu())
        kept.append(w)

    run_with_hooks(layer, inputs, device, [target.register_forward_pre_hook(target_input)],
                   lambda i: current.__setitem__(0, i), stop_after=[target])
    x = concatenated(rows)
    w = None if weights[0] is None else torch.cat(kept)
    store = Captured(x=[x], sample=plan_subsample([len(x)], max_tokens, seed, index, ranks))
    store.magnitude_sums = torch.zeros(x.shape[-1], dtype=torch.float64)
    for start in range(0, len(x), CHUNK):
        store.magnitude_sums += weighted_abs_sums(x[start:start + CHUNK], None if w is None else w[start:start + CHUNK])
    if store.sample.local is not None:
        store.x = [x[store.sample.local]]
    return store, [w]


def concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat of the per-sample rows, emptying the list as it goes (never two copies of them alive). One
    part (a token-wise group's draw, filled in place) is returned as it is: copying it would hold the
    group's largest capture twice (the down projection's input, tokens x intermediate)."""
    if not parts:
        return torch.empty(0)
    if len(parts) == 1:
        return parts.pop()
    out = torch.empty(sum(len(p) for p in parts), parts[0].shape[-1], dtype=parts[0].dtype, device=parts[0].device)
    start = 0
    while parts:
        part = parts.pop(0)
        out[start:start + len(part)] = part
        start += len(part)
    return out


def kept_magnitude(data: Captured, weights: torch.Tensor | None, ranks: Ranks) -> torch.Tensor:
    """channel_magnitude of every kept row of every rank, from the sums `capture` took."""
    count = torch.tensor([float(data.sample.kept)], dtype=torch.float64) if weights is None else \
        weights.double().sum()[None].cpu()
    sums = data.magnitude_sums.cpu() if data.magnitude_sums is not None else torch.zeros(0, dtype=torch.float64)
    totals = ranks.sum(torch.cat([sums, count]))
    return (totals[:-1] / totals[-1].clamp_min(1e-30)).float().clamp_min(1e-8)


def group_data(layer: nn.Module, group: ScalingGroup, streams: LayerStreams, run: RunContext, index: int,
               transform) -> tuple[Captured, Captured | None, list[torch.Tensor | None]]:
    """One group's captured inputs on the quantized path (and the FP path for the asymmetric target, on the
    same rows) and its kept token weights per sample."""
    hidden = streams.quantized.hidden
    weights = [group_token_weights(run.token_weights, index, group, i) for i in range(len(hidden))]
    part = getattr(run.config, transform.subsample_config)
    if group.routed:  # the asymmetric target is refused for routed experts (tlq.engine)
        data, kept = capture_routed(layer, group, streams.quantized, run.device, weights, part.max_tokens,
                                    part.seed, index, run.ranks)
        return data, None, kept if transform.token_weighted else [None]
    rows = [None if w is None else (w > 0).nonzero().squeeze(1) for w in weights]
    kept = [None if w is None else w[w > 0] for w in weights]
    counts = [token_rows(hidden, i) if r is None else len(r) for i, r in enumerate(rows)]
    blocks = transform.captures_blocks and group.mixes_tokens  # scored on whole samples, every kept row
    sample = plan_subsample(counts, 1 << 62 if blocks else part.max_tokens, part.seed, index, run.ranks)
    return_freed_memory()  # what the previous group's search left in heap holes (benchmarks/results/cost/README.md)
    rescoring = rescores(run.config)
    keep = Keep(rows=rescoring, calls=True, outputs=True) if blocks else Keep()
    data = capture(layer, group, streams.quantized, run.device, rows, keep, None if blocks else sample, kept)
    data.sample = sample
    if run.token_weights is not None and transform.token_weighted and rescoring:
        data.target_weights = [torch.cat([run.token_weights(index, t, i).reshape(-1)[r] for i, r in enumerate(rows)])
                               for t in group.targets]
    fp_data = None
    if run.config.loop.target == "asymmetric" and streams.mode == "separate":
        # the FP path gives a block only its reference outputs (the search replays the quantized path's calls)
        fp_keep = Keep(rows=False, outputs=True) if blocks else Keep()
        fp_data = capture(layer, group, streams.fp, run.device, rows, fp_keep, None if blocks else sample, kept)
    return data, fp_data, kept if transform.token_weighted else [None] * len(hidden)
