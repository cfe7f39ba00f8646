"""Per-channel rescaling of a scaling group before its Linears are quantized (AWQ, MBQ, TLQ, SmoothQuant).

A scaling group is a source (a norm, or a Linear whose output rows feed the targets) and the Linears it
feeds. Scaling input channel c of the targets by s_c and the source's output channel c by 1/s_c keeps
the FP function; it moves quantization difficulty between weights and activations.

- `search_scales` (AWQ-style): s = mean|x|^alpha over a grid of alpha, each candidate scored by an
  error function the caller builds (tlq.rescale scores the output of the block the group feeds, with
  the targets fake-quantized as deployed, token-weighted: uniform for AWQ, per modality for MBQ,
  gradient importance for TLQ). alpha = 0 (no scaling) is always a candidate.
- `smoothquant_scales`: s = max|x|^a / max|W|^(1-a) (Xiao et al., 2023), no search.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tlq.distributed import SINGLE, Ranks


def concat_targets(targets: list[nn.Linear]) -> torch.Tensor:
    return torch.cat([t.weight.detach().float() for t in targets], dim=0)


def weighted_error(diff: torch.Tensor, weights: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Sum over tokens of (token weight x per-token mean squared or absolute error); diff is [tokens, out]."""
    per_token = diff.abs().mean(-1) if loss == "mae" else diff.pow(2).mean(-1)
    if weights is None:
        return per_token.sum()
    return (per_token * weights).sum()


MAGNITUDE_ROWS = 4096  # rows per float64 partial sum in channel_magnitude


def channel_magnitude(x: torch.Tensor, weights: torch.Tensor | None = None, ranks: Ranks = SINGLE) -> torch.Tensor:
    """Token-weighted mean |x| per input channel over every rank's tokens; x is [tokens, in].

    Summed in float64 so that the magnitudes, hence the scales, do not depend on how tokens are split
    over ranks (with W*A8 a last-bit change in a scale can flip an activation rounding).
    """
    # In row chunks: a float64 copy of all of x would be 2x its float32 size again (5 GB for a 2B
    # down_proj's inputs from 128 samples), and the weighted product as much once more.
    sums = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), MAGNITUDE_ROWS):
        absolute = x[start:start + MAGNITUDE_ROWS].float().abs().double()
        sums += absolute.sum(0) if weights is None else (absolute * weights[start:start + MAGNITUDE_ROWS].double()[:, None]).sum(0)
    count = torch.tensor([float(len(x))], dtype=torch.float64, device=x.device) if weights is None else \
        weights.double().sum()[None]
    totals = ranks.sum(torch.cat([sums, count]))
    return (totals[:-1] / totals[-1].clamp_min(1e-30)).float().clamp_min(1e-8)


SCALE_FORMS = ("activation", "duo", "both")


def weight_magnitude(targets: list[nn.Linear], group_size: int | None) -> torch.Tensor:
    """Per input channel: the mean over the targets' rows of |W| divided by the largest |W| of its
    quantization group (the weight statistic of AutoAWQ's and llm-compressor's "duo" scaling)."""
    weight = concat_targets(targets).abs()
    width = weight.shape[1]
    group = group_size if group_size and width % group_size == 0 else width
    grouped = weight.reshape(weight.shape[0], width // group, group)
    normalised = grouped / (grouped.amax(-1, keepdim=True) + 1e-6)
    return normalised.reshape(weight.shape).mean(0)


def candidate_scales(magnitude: torch.Tensor, alpha: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """magnitude^alpha (or, given the weight magnitude, magnitude^alpha / weight^(1-alpha)), normalised so
    that max * min = 1. alpha = 0 without a weight magnitude is all ones (no scaling)."""
    if weight is None:
        if alpha == 0:
            return torch.ones_like(magnitude)
        scales = magnitude.pow(alpha)
    else:
        scales = (magnitude.pow(alpha) / (weight.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(magnitude: torch.Tensor, error: Callable[[torch.Tensor], float], grid: int = 20,
                  weight: torch.Tensor | None = None, form: str = "activation",
                  alpha_one: bool = False, rescore: Callable[[torch.Tensor], float] | None = None,
                  rescore_top: int = 0) -> tuple[torch.Tensor, dict, float]:
    """The candidate whose scales minimise `error`: no scaling first, then alpha in {k / grid}, k < grid
    (k <= grid with `alpha_one`), with s = x^alpha ("activation", the AWQ paper's form; k >= 1),
    s = x^alpha / w^(1-alpha) ("duo", AutoAWQ's and llm-compressor's default; k >= 0, needs `weight`), or both.

    With `rescore` and `rescore_top` = k > 0, the k candidates of least `error` are scored again by
    `rescore` (a dearer, closer measure: the error after the weight solver the Linears will get) and the
    least of those wins; `error` then only shortlists (and when k covers every candidate, it is computed
    only for no scaling and the winner, the two the returned ratio needs).

    An error function with a `bounded(scales, above)` method (tlq.rescale's block objective) is called
    through it with the least value that can still make the shortlist: it may stop summing once past it
    and return what it has, which is then larger than `above` too, so the candidate is out either way and
    the pick is the one full scoring makes (exactly: the sums are the same additions in the same order).
    The candidates are scored coarse to fine (`_coarse_to_fine`) so that a near-best one sets the bound
    early; the order changes what is run, never the pick (ties still go to the earlier candidate).

    Returns (scales, {"alpha", "form"} of the winner, its `error` / the `error` without scaling); ties keep the
    earlier candidate.
    """
    if form not in SCALE_FORMS:
        raise ValueError(f"unknown scale form {form!r}: use one of {SCALE_FORMS}")
    trials = _trials(grid, form, alpha_one)
    shortlisting = rescore is not None and rescore_top > 0
    scales = [lambda trial=trial: _trial_scales(magnitude, *trial, weight) for trial in trials]
    order = _coarse_to_fine(trials)
    if shortlisting and rescore_top >= len(trials):
        errors = {0: _bounded_score(error, scales[0](), None)}  # every candidate goes on: nothing to shortlist
        shortlist = set(order)
    else:
        errors = _least_errors(error, scales, order, rescore_top if shortlisting else 1)
        shortlist = set(sorted(errors, key=lambda i: (errors[i], i))[:rescore_top if shortlisting else 1])
    if shortlisting:
        rescored = _least_errors(rescore, scales, [i for i in order if i in shortlist], 1)
        best = min(rescored, key=lambda i: (rescored[i], i))
        if best not in errors:
            errors[best] = _bounded_score(error, scales[best](), None)
    else:
        (best,) = shortlist
    alpha, kind = trials[best]
    return scales[best](), {"alpha": alpha, "form": kind}, errors[best] / max(errors[0], 1e-30)


def _trials(grid: int, form: str, alpha_one: bool) -> list[tuple[float, str]]:
    """The candidates in their order (ties go to the earlier one): no scaling, then each form's alphas."""
    trials = [(0.0, "none")]
    last = grid + 1 if alpha_one else grid
    if form in ("activation", "both"):
        trials += [(step / grid, "activation") for step in range(1, last)]
    if form in ("duo", "both"):
        trials += [(step / grid, "duo") for step in range(last)]
    return trials


def _coarse_to_fine(trials: list[tuple[float, str]]) -> list[int]:
    """The order candidates are scored in: no scaling, then each form's alphas every 8th, every 4th, every
    2nd, the rest. The bound prunes a candidate only once some other has scored below it, so a coarse
    sweep first finds the basin early; scored in the grid's order instead, every alpha on the way down to the
    best one is a new best and runs in full (benchmarks/results/scale_search_bound: both orders)."""
    keys, seen = [], {}
    for index, (_, kind) in enumerate(trials):
        position = seen[kind] = seen.get(kind, -1) + 1
        level = next((level for level, stride in enumerate((8, 4, 2)) if position % stride == stride // 2), 3)
        keys.append((kind != "none", level, position, index))
    return [key[-1] for key in sorted(keys)]


def _least_errors(error: Callable, scales: list[Callable[[], torch.Tensor]], order: list[int],
                  keep: int) -> dict[int, float]:
    """The errors of the candidates in `order`, each bounded by the keep-th least so far: a candidate past
    it cannot be among the `keep` least (its value is then only a lower bound, larger than that one)."""
    errors: dict[int, float] = {}
    for index in order:
        bound = sorted(errors.values())[keep - 1] if len(errors) >= keep else None
        errors[index] = _bounded_score(error, scales[index](), bound)
    return errors


def _bounded_score(error: Callable, scales: torch.Tensor, above: float | None) -> float:
    bounded = getattr(error, "bounded", None)
    return float(bounded(scales, above)) if bounded is not None else float(error(scales))


def _trial_scales(magnitude: torch.Tensor, alpha: float, kind: str, weight: torch.Tensor | None) -> torch.Tensor:
    return candidate_scales(magnitude, alpha if kind != "none" else 0.0, weight if kind == "duo" else None)


@torch.no_grad()
def smoothquant_scales(x: torch.Tensor, targets: list[nn.Linear], alpha: float = 0.5,
                       ranks: Ranks = SINGLE) -> torch.Tensor:
    local_max = x.float().abs().amax(0) if len(x) else x.new_zeros(x.shape[-1], dtype=torch.float32)
    act_max = ranks.max(local_max).clamp_min(1e-5)
    weight_max = concat_targets(targets).abs().amax(0).clamp_min(1e-5)
    return (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def apply_scales(source: nn.Module, targets: list[nn.Linear], scales: torch.Tensor,
                 source_weight_offset: float = 0.0) -> None:
    """Fold 1/s into the source's output channels and s into the targets' input columns, in place.

    In place, so the layer's memory stays one copy of its weights (a new tensor bound beside a checkpoint's
    memory-mapped one left both resident). Nothing may hold the unscaled weights for later: the loop takes
    its FP references before rescaling, and its FP view (tlq.observe.fp_view) after. A norm that multiplies
    by (offset + weight) gets (offset + weight) / s - offset.
    """
    if isinstance(source, nn.Linear):
        source.weight.data.div_(scales.to(source.weight)[:, None])
        if source.bias is not None:
            source.bias.data.div_(scales.to(source.bias))
    elif source_weight_offset:  # y = (offset + weight) * normalised(x)
        folded = (source.weight.float() + source_weight_offset) / scales.float().to(source.weight.device)
        source.weight.data.copy_((folded - source_weight_offset).to(source.weight.dtype))
    else:  # RMSNorm / LayerNorm: y = weight * normalised(x) (+ bias)
        source.weight.data.div_(scales.to(source.weight))
        if getattr(source, "bias", None) is not None:
            source.bias.data.div_(scales.to(source.bias))
    for target in targets:
        target.weight.data.mul_(scales.to(target.weight)[None, :])


def group_applies(source: nn.Module, targets: list[nn.Linear]) -> bool:
    """A Linear source feeds the targets channel for channel only when the shapes match (not under GQA)."""
    width = targets[0].in_features
    if isinstance(source, nn.Linear):
        return source.out_features == width
    return getattr(source, "weight", None) is not None and source.weight.numel() == width
